"""The study across seeds: fine-tunes grouped into arms (one group = one fine-tune id over its
seeds), lambda and density chosen per merge method on mean validation macro-F1 (never on
test), test macro-F1 as mean +- sd with a bootstrap interval, and every arm compared with Full FT
and CPT->FT on the same test examples and seeds.

Reads finished, fresh stages only (see :mod:`cmmerge.io.transaction`); pure reading and
numbers, the tables and plots are written by :mod:`cmmerge.reporting.paper`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmmerge.io import transaction
from cmmerge.io.manifest import read_json, read_manifest
from cmmerge.reporting.stats import Comparison, Interval, compare, mean_sd, score_interval

_SEED = re.compile(r"-s(\d+)$")
_NUMBER = r"-?[0-9.]+(?:e[-+]?[0-9]+)?"
_SCALE = re.compile(rf"^(?P<method>[a-z_]+)-l(?P<scale>{_NUMBER})(?:-d(?P<density>{_NUMBER}))?")
REFERENCES = ("Full FT", "CPT->FT")


@dataclass
class Evaluation:
    """Test predictions of one fine-tune on one task."""

    gold: np.ndarray
    pred: np.ndarray
    labels: list[str]
    macro_f1: float


@dataclass
class Seeded:
    """One fine-tune (one seed) and its fresh evaluations."""

    run: str
    group: str
    arm: str
    task: str
    seed: int
    val_f1: float
    merge: dict | None
    tests: dict[str, Evaluation] = field(default_factory=dict)


@dataclass
class Arm:
    """One fine-tune id over its seeds (a row of the paper's table)."""

    run: str
    group: str
    arm: str
    task: str
    merge: dict | None
    members: list[Seeded]
    family: str = ""
    chosen: bool = True
    selection: dict | None = None

    @property
    def seeds(self) -> list[int]:
        return [m.seed for m in self.members]

    @property
    def val(self) -> tuple[float, float, int]:
        return mean_sd([m.val_f1 for m in self.members])

    def test(self, task: str) -> tuple[float, float, int] | None:
        values = [m.tests[task].macro_f1 for m in self.members if task in m.tests]
        return mean_sd(values) if values else None

    def predictions(self, task: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(gold ``[n]``, predictions ``[seeds, n]``, number of labels) on ``task``."""
        by_seed = {m.seed: m.tests[task] for m in self.members if task in m.tests}
        evals = [by_seed[s] for s in seeds]
        return evals[0].gold, np.stack([e.pred for e in evals]), len(evals[0].labels)


def _evaluation(eval_dir: Path) -> Evaluation | None:
    manifest = transaction.finished_manifest(eval_dir)
    if manifest is None or transaction.stale_inputs(manifest):
        return None
    metrics = read_json(eval_dir / "metrics.json")
    labels = list(metrics["confusion_matrix"]["labels"])
    index = {name: i for i, name in enumerate(labels)}
    gold, pred = [], []
    with open(eval_dir / "predictions.jsonl", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            gold.append(index[row["gold"]])
            pred.append(index[row["pred"]])
    return Evaluation(np.asarray(gold), np.asarray(pred), labels, float(metrics["macro_f1"]))


def _merge_settings(manifest: dict) -> dict | None:
    """Method, lambda, density and sources of the merge a fine-tune started from."""
    if not manifest.get("merge_id"):
        return None
    for item in manifest.get("inputs") or []:
        upstream = read_manifest(Path(item["path"])) if isinstance(item, dict) else None
        if upstream and upstream.get("stage") == "merge":
            cfg = upstream.get("config", {})
            return {
                "method": cfg.get("method"),
                "lambda": cfg.get("lambda"),
                "density": (cfg.get("params") or {}).get("density"),
            }
    match = _SCALE.match(str(manifest["merge_id"]))
    if match is None:
        return None
    density = match.group("density")
    return {
        "method": match.group("method"),
        "lambda": float(match.group("scale")),
        "density": float(density) if density else None,
    }


def collect(run_dir: Path) -> list[Seeded]:
    """Every finished, fresh fine-tune of a run directory with its fresh evaluations."""
    out = []
    for ft_dir in sorted((run_dir / "finetune").glob("*/")):
        manifest = transaction.finished_manifest(ft_dir)
        if manifest is None or transaction.stale_inputs(manifest):
            continue
        seed = int(manifest.get("config", {}).get("seed", 0))
        item = Seeded(
            run=str(run_dir),
            group=_SEED.sub("", ft_dir.name),
            arm=str(manifest.get("arm", ft_dir.name)),
            task=str(manifest.get("task")),
            seed=seed,
            val_f1=float(manifest["metrics"]["macro_f1"]),
            merge=_merge_settings(manifest),
        )
        for eval_dir in sorted((run_dir / "evaluate" / ft_dir.name).glob("*/")):
            evaluation = _evaluation(eval_dir)
            if evaluation is not None:
                item.tests[eval_dir.name] = evaluation
        out.append(item)
    return out


def group_arms(seeded: list[Seeded]) -> list[Arm]:
    """One arm per (run directory, fine-tune id without its seed)."""
    arms: dict[tuple[str, str], Arm] = {}
    for s in seeded:
        key = (s.run, s.group)
        if key not in arms:
            arms[key] = Arm(s.run, s.group, s.arm, s.task, s.merge, [])
        arms[key].members.append(s)
    for arm in arms.values():
        arm.members.sort(key=lambda m: m.seed)
        arm.family = _SCALE.sub(lambda m: m.group("method"), arm.group) if arm.merge else arm.group
    return list(arms.values())


def select_scales(arms: list[Arm]) -> None:
    """Within each family (the same arm but for lambda and density), keep the arm with the
    best mean validation macro-F1 over seeds; record the choice and the candidates."""
    families: dict[tuple[str, str], list[Arm]] = {}
    for arm in arms:
        if arm.merge is not None:
            families.setdefault((arm.run, arm.family), []).append(arm)
    for members in families.values():
        best = max(members, key=lambda a: (a.val[0], -(a.merge or {}).get("lambda", 0)))
        candidates = [
            {"lambda": a.merge["lambda"], "density": a.merge.get("density"), "val": a.val[0]}
            for a in members
        ]
        for arm in members:
            arm.chosen = arm is best
            arm.selection = {
                "by": "mean validation macro-F1 over seeds",
                "lambda": best.merge["lambda"],
                "density": best.merge.get("density"),
                "candidates": sorted(candidates, key=lambda c: (c["lambda"], c["density"] or 0)),
            }


@dataclass
class Cell:
    """One arm on one test task: mean +- sd over seeds, interval, and comparisons."""

    mean: float
    sd: float
    n: int
    interval: Interval | None  # None for a lambda not chosen (only its mean is plotted)
    versus: dict[str, Comparison]


def _reference(arms: list[Arm], arm: Arm, name: str) -> Arm | None:
    """The Full FT / CPT->FT arm an arm is compared with: same run and training task, most
    seeds."""
    found = [a for a in arms if a.arm == name and a.run == arm.run and a.task == arm.task]
    return max(found, key=lambda a: len(a.members)) if found else None


def cells(arms: list[Arm], n_resamples: int = 1000, seed: int = 0) -> dict[tuple, Cell]:
    """``{(run, group, test task): Cell}`` for every arm and every task it was tested on."""
    out = {}
    for arm in arms:
        tasks = sorted({t for m in arm.members for t in m.tests})
        for task in tasks:
            seeds = [m.seed for m in arm.members if task in m.tests]
            gold, preds, k = arm.predictions(task, seeds)
            mean, sd, n = arm.test(task)
            if not arm.chosen:
                out[(arm.run, arm.group, task)] = Cell(mean, sd, n, None, {})
                continue
            versus = {}
            for name in REFERENCES:
                ref = _reference(arms, arm, name)
                if ref is None or ref is arm:
                    continue
                paired = [
                    s for s in seeds if any(m.seed == s and task in m.tests for m in ref.members)
                ]
                if not paired:
                    continue
                _, preds_a, _ = arm.predictions(task, paired)
                ref_gold, preds_b, _ = ref.predictions(task, paired)
                if not np.array_equal(gold, ref_gold):
                    continue  # another test set: nothing to pair
                versus[name] = compare(
                    gold, preds_a, preds_b, k, n_resamples=n_resamples, seed=seed
                )
            interval = score_interval(gold, preds, k, n_resamples=n_resamples, seed=seed)
            out[(arm.run, arm.group, task)] = Cell(mean, sd, n, interval, versus)
    return out


def study(run_dirs: list[Path], n_resamples: int = 1000, seed: int = 0) -> tuple[list[Arm], dict]:
    """Arms of the run directories (lambda chosen) and their cells."""
    arms = group_arms([s for d in run_dirs for s in collect(Path(d))])
    select_scales(arms)
    return arms, cells(arms, n_resamples=n_resamples, seed=seed)
