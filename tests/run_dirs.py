"""Run directories written as the stages write them, without training: the config views from the
stage specs, upstream stages as inputs (CPT, extract, merge), and made-up validation scores and
test predictions. The report reads manifests, metrics and predictions only, so its tables can be
checked on known answers in seconds (tests/test_report_variants.py, test_report_sections.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from conftest import compose

from cmmerge.config.ids import arm_name
from cmmerge.config.specs import CptSpec, EvaluateSpec, ExtractSpec, FinetuneSpec, MergeSpec
from cmmerge.config.values import run_context
from cmmerge.io.manifest import write_json_atomic, write_jsonl_atomic
from cmmerge.stages.runner import run_transaction, stage_input

LABELS = ["negative", "neutral", "positive"]
N = 300
MODEL = {"path": "/models/tiny-xlmr-749fc39921981bdf", "sha256": "ab" * 32}
BASE = ["model=tiny-xlmr", "train=smoke", "finetune.train_size=300"]
TV = ["init=merged", "method=task_arithmetic", "lambda=0.5"]


def config(tmp_path, run, *extra):
    """The fine-tune config of run ``run`` under ``tmp_path`` with ``extra`` overrides."""
    return compose("finetune", [f"run.root={tmp_path}", f"run.name={run}", *BASE, *extra])


def _done(cfg, spec, inputs, result=None):
    run_transaction(
        run_context(cfg),
        spec.STAGE,
        spec.folder,
        spec.config_view(),
        inputs,
        lambda d: result or {},
    )
    return stage_input(spec.folder, "made by the test")


def _start(cfg) -> tuple[list[dict], str]:
    """The upstream stages of ``cfg``'s fine-tune (written when missing) and its init folder."""
    if str(cfg.init) == "base":
        return [MODEL], MODEL["path"]
    cpt = CptSpec.from_config(cfg)
    cpt_in = _done(cfg, cpt, [MODEL])
    if str(cfg.init) == "cpt":
        return [cpt_in], str(cpt.folder / "model")
    extract = ExtractSpec.from_config(cfg)
    extract_in = _done(cfg, extract, [MODEL, cpt_in])
    merge = MergeSpec.from_config(cfg)
    merge = merge.resolve(source_paths=[str(extract.folder / "tau.safetensors")],
                          source_weights=[1.0])  # fmt: skip
    return [_done(cfg, merge, [MODEL, extract_in])], str(merge.folder / "model")


def predictions(accuracy: float, seed: int) -> tuple[list[int], list[int]]:
    """One test set; on each seed the same draw decides which examples are wrong, so a more
    accurate arm's errors nest in a less accurate one's (differences steady across seeds)."""
    rng = np.random.default_rng(1000 + seed)
    gold = np.random.default_rng(7).integers(0, 3, N)
    wrong = rng.random(N) > accuracy
    return gold.tolist(), np.where(wrong, (gold + rng.integers(1, 3, N)) % 3, gold).tolist()


def evaluation_work(gold: Sequence[int], pred: Sequence[int], macro_f1: float, accuracy: float):
    """An evaluate stage's ``work``: writes ``metrics.json`` (the given scores) and
    ``predictions.jsonl`` (gold and predicted labels) as the stage does."""

    def work(d):
        labels = {"labels": LABELS}
        metrics = {"macro_f1": macro_f1, "accuracy": accuracy, "confusion_matrix": labels}
        write_json_atomic(d / "metrics.json", metrics)
        rows = zip(gold, pred, strict=True)
        write_jsonl_atomic(
            d / "predictions.jsonl", ({"gold": LABELS[g], "pred": LABELS[p]} for g, p in rows)
        )
        return {}

    return work


def _per_seed(value: float | Sequence[float], seeds: Sequence[int]) -> dict[int, float]:
    if isinstance(value, int | float):
        return {seed: float(value) for seed in seeds}
    return dict(zip(seeds, map(float, value), strict=True))


def finetune(
    cfg,
    accuracy: float | Sequence[float],
    seeds: Sequence[int] = (0, 1),
    val: float | Sequence[float] | None = None,
    tests: dict[str, float] | None = None,
) -> str:
    """Finished fine-tunes of ``cfg`` (one per seed) and their evaluations; the folder id.

    Args:
        accuracy: test accuracy (one, or one per seed).
        val: validation macro-F1 recorded by each fine-tune (one, or per seed); default the
            accuracy.
        tests: ``{evaluation task: accuracy offset}``; default the fine-tune's own task only.
    """
    accuracies = _per_seed(accuracy, seeds)
    vals = _per_seed(accuracy if val is None else val, seeds)
    inputs, init_dir = _start(cfg)
    for seed in seeds:
        scfg = cfg.copy()
        scfg.seed = seed
        spec = FinetuneSpec.from_config(scfg).resolve(init_dir=init_dir, labels=LABELS)
        merge_id = MergeSpec.from_config(scfg).folder_id if str(cfg.init) == "merged" else None
        result = {
            "metrics": {"macro_f1": vals[seed]},
            "arm": arm_name(scfg),
            "task": str(cfg.task.name),
            "merge_id": merge_id,
        }
        ft_in = _done(scfg, spec, inputs, result)
        for task, offset in (tests or {str(cfg.task.name): 0.0}).items():
            evaluation = EvaluateSpec.from_config(scfg, task).resolve(labels=LABELS)
            acc = accuracies[seed] + offset

            gold, pred = predictions(acc, seed)
            hits = np.array(pred) == np.array(gold)
            f1 = float(np.mean([hits[np.array(gold) == k].mean() for k in (0, 1, 2)]))
            work = evaluation_work(gold, pred, f1, acc)
            run_transaction(
                run_context(scfg),
                "evaluate",
                evaluation.folder,
                evaluation.config_view(),
                [ft_in],
                work,
            )
    return spec.folder.name.rsplit("-s", 1)[0]
