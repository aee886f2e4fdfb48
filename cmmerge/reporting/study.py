"""The study across seeds: fine-tunes grouped into arms (one group = one fine-tune id over its
seeds), lambda and density chosen per merge method on mean validation macro-F1 (never on
test), test macro-F1 as mean +- sd with a bootstrap interval, and every arm compared with Full FT
and CPT->FT on the same test examples and seeds.

Reads finished, fresh stages only (see :mod:`cmmerge.io.transaction`); pure reading and
numbers, the tables and plots are written by :mod:`cmmerge.reporting.paper`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmmerge.io import transaction
from cmmerge.io.manifest import read_json, read_manifest
from cmmerge.reporting import variants
from cmmerge.reporting.seed_stats import compare_seeds
from cmmerge.reporting.stats import Comparison, Interval, compare, mean_sd, score_interval

_SEED = re.compile(r"-s(\d+)$")
# A multi-source merge's source seed (``-src_cpt+TASK_s1``): the seed of the fine-tune made
# from it, so the seeds of one arm group together as for any other arm.
_SOURCE_SEED = re.compile(r"(-src_[^@]*?)_s\d+")
_PROMPT_SEED = re.compile(r"-s\d+(?=(?:-norm)?(?:-[0-9a-f]{6})?$)")  # in a prompt folder's name
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
    units: np.ndarray | None = None  # token-level tasks: the sentence of each word


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
    kind: str = ""  # the arm's name in its manifest (``CPT->FT``), without a variant tag
    cpt: str | None = None  # the CPT it was made from (init=cpt or a merge), else None
    settings: dict[str, str] = field(default_factory=dict)  # see :mod:`.variants`
    folder: str = ""  # the fine-tune's folder name


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
    kind: str = ""
    cpt: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    tag: str = ""  # the settings it differs in from the other variants (``epochs=2``)
    configured: bool = True  # made with the report's configuration's settings
    shown: bool = True  # in the report's tables (other variants: report.all_variants=true)

    @property
    def seeds(self) -> list[int]:
        return [m.seed for m in self.members]

    @property
    def val(self) -> tuple[float, float, int]:
        return mean_sd([m.val_f1 for m in self.members])

    def test(self, task: str) -> tuple[float, float, int] | None:
        values = [m.tests[task].macro_f1 for m in self.members if task in m.tests]
        return mean_sd(values) if values else None

    def units(self, task: str) -> np.ndarray | None:
        """The resampling unit of each test example on ``task`` (None: each example)."""
        return next(m.tests[task].units for m in self.members if task in m.tests)

    def predictions(self, task: str, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
        """(gold ``[n]``, predictions ``[seeds, n]``, number of labels) on ``task``."""
        by_seed = {m.seed: m.tests[task] for m in self.members if task in m.tests}
        evals = [by_seed[s] for s in seeds]
        return evals[0].gold, np.stack([e.pred for e in evals]), len(evals[0].labels)


def _evaluation(eval_dir: Path, predictions: bool = True) -> Evaluation | None:
    manifest = transaction.finished_manifest(eval_dir)
    if manifest is None or transaction.stale_inputs(manifest):
        return None
    metrics = read_json(eval_dir / "metrics.json")
    labels = list(metrics["confusion_matrix"]["labels"])
    if not predictions:  # scores only (the sweep's summary)
        empty = np.zeros(0, dtype=int)
        return Evaluation(empty, empty, labels, float(metrics["macro_f1"]))
    index = {name: i for i, name in enumerate(labels)}
    gold, pred, units = [], [], []
    with open(eval_dir / "predictions.jsonl", encoding="utf-8") as f:
        for number, line in enumerate(f):
            row = json.loads(line)
            if isinstance(row["gold"], list):  # a token-level task: words scored, sentences drawn
                gold.extend(index[g] for g in row["gold"])
                pred.extend(index[p] for p in row["pred"])
                units.extend([number] * len(row["gold"]))
                continue
            gold.append(index[row["gold"]])
            pred.append(index[row["pred"]])
    score = float(metrics["macro_f1"])
    sentences = np.asarray(units) if units else None
    return Evaluation(np.asarray(gold), np.asarray(pred), labels, score, sentences)


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


def _cpt_of(manifest: dict) -> str | None:
    """The CPT id a fine-tune was made from: after ``@`` in its merge id, or the folder of its
    ``init=cpt`` model; None for a fine-tune of the base (or of a folder)."""
    if manifest.get("merge_id"):
        return str(manifest["merge_id"]).rpartition("@")[2] or None
    config = manifest.get("config") or {}
    if str(config.get("init")) == "cpt" and config.get("init_dir"):
        return Path(str(config["init_dir"])).parent.name
    return None


def collect(run_dir: Path, predictions: bool = True) -> list[Seeded]:
    """Every finished, fresh fine-tune of a run directory with its fresh evaluations
    (``predictions=False``: their scores only) and the settings it was made with
    (:func:`.variants.finetune_settings`)."""
    out = []
    cache: dict = {}
    for ft_dir in sorted((run_dir / "finetune").glob("*/")):
        manifest = transaction.finished_manifest(ft_dir)
        if manifest is None or transaction.stale_inputs(manifest):
            continue
        seed = int(manifest.get("config", {}).get("seed", 0))
        kind = str(manifest.get("arm", ft_dir.name))
        item = Seeded(
            run=str(run_dir),
            group=_SOURCE_SEED.sub(r"\1", _SEED.sub("", ft_dir.name)),
            arm=kind,
            task=str(manifest.get("task")),
            seed=seed,
            val_f1=float(manifest["metrics"]["macro_f1"]),
            merge=_merge_settings(manifest),
            kind=kind,
            cpt=_cpt_of(manifest),
            folder=ft_dir.name,
        )
        for eval_dir in sorted((run_dir / "evaluate" / ft_dir.name).glob("*/")):
            evaluation = _evaluation(eval_dir, predictions)
            if evaluation is not None:
                item.tests[eval_dir.name] = evaluation
        own = read_manifest(run_dir / "evaluate" / ft_dir.name / item.task)
        item.settings = variants.finetune_settings(manifest, own, cache)
        if item.cpt and "cpt" not in item.settings:  # a manifest that names its CPT only
            cpt = read_manifest(run_dir / "cpt" / item.cpt) or {}
            item.settings.update(variants.view_settings(cpt.get("config") or {}, "cpt", "cpt"))
            item.settings["cpt"] = item.cpt
        out.append(item)
    return out + _prompts(run_dir, predictions)


def _prompts(run_dir: Path, predictions: bool) -> list[Seeded]:
    """Every finished, fresh prompting run (nothing is trained: no validation score), one seed
    (one draw of shots) each, scored on its task."""
    out = []
    for stage_dir in sorted((run_dir / "prompt").glob("*/")):
        evaluation = _evaluation(stage_dir, predictions)  # None: not finished, or stale
        manifest = read_manifest(stage_dir) if evaluation is not None else None
        if manifest is None:
            continue
        kind, task = str(manifest.get("arm", stage_dir.name)), str(manifest.get("task"))
        item = Seeded(
            run=str(run_dir),
            group=_PROMPT_SEED.sub("", stage_dir.name),
            arm=kind,
            task=task,
            seed=int(manifest.get("seed") or 0),
            val_f1=float("nan"),
            merge=None,
            kind=kind,
            folder=stage_dir.name,
        )
        item.tests[task] = evaluation
        out.append(item)
    return out


def group_arms(seeded: list[Seeded]) -> list[Arm]:
    """One arm per (run directory, fine-tune id without its seed); arms of one name that
    differ in their settings are tagged with them (``Full FT [epochs=2]``)."""
    arms: dict[tuple[str, str], Arm] = {}
    for s in seeded:
        key = (s.run, s.group)
        if key not in arms:
            arms[key] = Arm(s.run, s.group, s.arm, s.task, s.merge, [], kind=s.kind, cpt=s.cpt,
                            settings=s.settings)  # fmt: skip
        arms[key].members.append(s)
    for arm in arms.values():
        arm.members.sort(key=lambda m: m.seed)
        arm.family = _SCALE.sub(lambda m: m.group("method"), arm.group) if arm.merge else arm.group
    out = list(arms.values())
    variants.tag_variants(out)
    return out


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


def chosen_scales(run_dir: Path) -> list[dict]:
    """The lambda (and density) :func:`select_scales` chooses for each merge family of a run
    directory, on mean validation macro-F1 over seeds (never test): one row per family with
    the chosen arm's mean validation and test macro-F1 and the seeds. The sweep's summary and
    the CLI's closing line show these rows, the report records the same choice."""
    arms = group_arms(collect(Path(run_dir), predictions=False))
    select_scales(arms)
    rows = []
    for arm in sorted(arms, key=lambda a: a.family):
        if arm.merge is None or not arm.chosen:
            continue
        val, sd, n = arm.val
        test = arm.test(arm.task)
        rows.append(
            {
                "family": arm.family,
                "method": arm.merge.get("method"),
                "lambda": arm.merge.get("lambda"),
                "density": arm.merge.get("density"),
                "arm": arm.arm,
                "task": arm.task,
                "seeds": " ".join(map(str, arm.seeds)),
                "val_macro_f1_mean": val,
                "val_macro_f1_sd": sd,
                "test_macro_f1_mean": test[0] if test else None,
                "candidates": len((arm.selection or {}).get("candidates") or []),
            }
        )
    return rows


@dataclass
class Cell:
    """One arm on one test task: mean +- sd over seeds, interval, and comparisons (keyed by
    reference name, with the label of the arm compared with in ``partners``, and why a
    comparison was left out in ``notes``)."""

    mean: float
    sd: float
    n: int
    interval: Interval | None  # None for a lambda not chosen (only its mean is plotted)
    versus: dict[str, Comparison]
    partners: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def row_label(arm: Arm) -> str:
    """The arm's name without its lambda (chosen per task on validation)."""
    return variants.strip_lambda(arm.arm)


def partner_label(ref: Arm, arm: Arm) -> str:
    """The reference's row name as seen from ``arm`` (its run named when another's)."""
    label = row_label(ref)
    return label if ref.run == arm.run else f"{label} [{Path(ref.run).name}]"


def _reference(arms: list[Arm], arm: Arm, name: str) -> tuple[Arm | None, str]:
    """(the Full FT / CPT->FT arm ``arm`` is compared with, or None and why not). The
    reference is trained on the same task with the same settings apart from the arm itself
    (:func:`.variants.like_for_like`; a CPT both have is the same CPT), in the same run where
    it has one, else in another run of the report; an arm is not compared with its own kind."""
    if variants.base_name(arm.kind) == name:
        return None, ""
    found = [a for a in arms if variants.base_name(a.kind) == name and a.task == arm.task]
    if not found:
        return None, ""
    like = [a for a in found if not variants.like_for_like(a.settings, arm.settings)]
    if not like:
        keys = sorted({k for a in found for k in variants.like_for_like(a.settings, arm.settings)})
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return None, f"no {name} with the same settings (they differ in {shown})"
    like = [a for a in like if a.run == arm.run] or like
    distinct = {json.dumps(a.settings, sort_keys=True) for a in like}
    if len(distinct) > 1:
        names = ", ".join(sorted(partner_label(a, arm) for a in like))
        return None, f"several {name} variants fit ({names}): see their rows"
    return max(like, key=lambda a: (len(a.members), a.group)), ""


def versus(
    arm: Arm, ref: Arm, task: str, n_resamples: int = 1000, seed: int = 0
) -> tuple[Comparison | None, str]:
    """``arm`` minus ``ref`` on ``task``'s test examples, seeds paired: the example-level
    comparison with the seed-level statistics in ``seeds`` (or None and why not)."""
    seeds = [m.seed for m in arm.members if task in m.tests]
    paired = [s for s in seeds if any(m.seed == s and task in m.tests for m in ref.members)]
    if not paired:
        return None, f"no seed in common with {partner_label(ref, arm)}"
    gold, preds_a, k = arm.predictions(task, paired)
    ref_gold, preds_b, _ = ref.predictions(task, paired)
    if not np.array_equal(gold, ref_gold):
        return None, f"other test examples than {partner_label(ref, arm)}"
    options = {"n_resamples": n_resamples, "seed": seed, "units": arm.units(task)}
    example = compare(gold, preds_a, preds_b, k, **options)
    seeds = compare_seeds(gold, preds_a, preds_b, k, **options)
    return dataclasses.replace(example, seeds=seeds), ""


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
            cell = Cell(mean, sd, n, None, {})
            for name in REFERENCES:
                ref, why = _reference(arms, arm, name)
                if ref is not None:
                    comparison, why = versus(arm, ref, task, n_resamples, seed)
                    if comparison is not None:
                        cell.versus[name] = comparison
                        cell.partners[name] = partner_label(ref, arm)
                if why:
                    cell.notes[name] = why
            cell.interval = score_interval(
                gold, preds, k, n_resamples=n_resamples, seed=seed, units=arm.units(task)
            )
            out[(arm.run, arm.group, task)] = cell
    return out


def study(
    run_dirs: list[Path],
    n_resamples: int = 1000,
    seed: int = 0,
    made: variants.Configured | None = None,
    all_variants: bool = True,
) -> tuple[list[Arm], dict]:
    """Arms of the run directories (lambda chosen) and their cells; with ``made`` (what a
    configuration makes), the arms made with its settings marked (and, unless
    ``all_variants``, only those shown)."""
    arms = group_arms([s for d in run_dirs for s in collect(Path(d))])
    select_scales(arms)
    if made is not None:
        variants.mark_configured(arms, made, hide=not all_variants)
    return arms, cells(arms, n_resamples=n_resamples, seed=seed)
