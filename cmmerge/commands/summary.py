"""The closing line of a command: what the stage found and where it wrote it.

``closing_line(stage, cfg, result)`` turns what a stage's ``run`` returned (its manifest, or the
per-task metrics of ``evaluate``) into one line, e.g.
``merge: ties lambda=0.5 density=0.2: 36 tensors merged, 4 copied in 0.7 s -> runs/hi/merge/...``.
A stage that was skipped says ``up to date`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cmmerge.config.values import run_dir


def _f(value: Any, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}" if isinstance(value, int | float) else "n/a"


def _g(value: Any) -> str:
    return f"{float(value):.5g}" if isinstance(value, int | float) else "n/a"


def _dirs(cfg: DictConfig) -> dict[str, Path]:
    from cmmerge.config.ids import stage_dirs

    return stage_dirs(cfg)


def _data(cfg: DictConfig, m: dict) -> str:
    x = m.get("metrics", {})
    sizes = " / ".join(
        f"{split} {x[f'{split}_size']:,}"
        for split in ("train", "validation", "test")
        if f"{split}_size" in x
    )
    kept = x.get("corpus_kept")
    corpus = f"; CPT corpus {kept:,} texts kept" if isinstance(kept, int) else ""
    return f"{cfg.task.name}: {sizes}{corpus} -> {_dirs(cfg)['data'] / 'stats.json'}"


def _cpt(cfg: DictConfig, m: dict) -> str:
    x = m.get("metrics", {})
    steps = f" after {x['steps']} steps" if "steps" in x else ""
    ppl = f"held-out perplexity {_g(x.get('perplexity_before'))} -> {_g(x.get('perplexity'))}"
    return f"{ppl}{steps} -> {_dirs(cfg)['cpt'] / 'model'}"


def _extract(cfg: DictConfig, m: dict) -> str:
    x = m.get("metrics", {})
    size = f"{x.get('n_tensors', '?')} tensors, {x.get('n_params', 0):,} parameters"
    where = _dirs(cfg)["extract"] / "task_vector.safetensors"
    return f"task vector of {size}, L2 norm {_g(x.get('l2_norm'))} -> {where}"


def _merge(cfg: DictConfig, m: dict) -> str:
    c, x = m.get("config", {}), m.get("metrics", {})
    params = "".join(
        f" {k}={v:g}" if isinstance(v, float) else f" {k}={v}"
        for k, v in (c.get("params") or {}).items()
        if k in ("density", "sign", "trim_scope")
    )
    copied = f", {x['n_copied']} copied" if x.get("n_copied") else ""
    where = Path(str(cfg.output)) if cfg.get("output") else _dirs(cfg)["merge"] / "model"
    grown = m.get("vocab_grown") or {}
    rows = f", vocabulary grown to {max(grown.values())} rows (grow_vocab=true)" if grown else ""
    return (
        f"{c.get('method', cfg.method.name)} lambda={float(c.get('lambda', 0)):g}{params}: "
        f"{x.get('n_merged', '?')} tensors merged{copied}{rows} in "
        f"{m.get('wall_time_s', 0):.1f} s -> {where}"
    )


def _finetune(cfg: DictConfig, m: dict) -> str:
    x = m.get("metrics", {})
    arm = f"{m['arm']}: " if m.get("arm") else ""
    flat = ", no better than the majority class" if m.get("baseline_warning") else ""
    return (
        f"{arm}validation macro-F1 {_f(x.get('macro_f1'))} (accuracy {_f(x.get('accuracy'))}"
        f"{flat}) -> {_dirs(cfg)['finetune'] / 'model'}"
    )


def _evaluate(cfg: DictConfig, per_task: dict) -> str:
    scores = ", ".join(f"{_f(x.get('macro_f1'))} on {task}" for task, x in per_task.items())
    return f"test macro-F1 {scores} -> {_dirs(cfg)['evaluate']}"


def _prompt(cfg: DictConfig, m: dict) -> str:
    from cmmerge.config.specs import PromptSpec

    x = m.get("metrics", {})
    where = run_dir(cfg) / "prompt" / PromptSpec.from_config(cfg).folder_id
    how = f" ({m['scoring']})" if m.get("scoring") else ""
    base = ""
    if m.get("majority_macro_f1") is not None:
        verdict = "beats" if m.get("beats_majority") else "does NOT beat"
        base = (
            f", {verdict} the majority class ('{m.get('majority_label')}': "
            f"{_f(m['majority_macro_f1'])})"
        )
    return (
        f"{m.get('arm', 'prompting')}: test macro-F1 {_f(x.get('macro_f1'))}{how}{base} -> {where}"
    )


def best_lambdas(run: Path) -> str:
    """The lambda (and density) chosen per merge method in a run directory, as the sweep's
    summary and the report choose it (mean validation macro-F1 over seeds,
    :func:`~cmmerge.reporting.study.chosen_scales`), in words."""
    from cmmerge.reporting.study import chosen_scales

    rows = chosen_scales(run)
    methods = [str(r["method"]) for r in rows]
    shown = []
    for row in rows:
        name = row["method"] if methods.count(str(row["method"])) == 1 else row["family"]
        density = f" density={row['density']:g}" if row["density"] is not None else ""
        n = len(row["seeds"].split())
        seeds = f", mean of {n} seeds" if n > 1 else ""
        shown.append(
            f"{name} lambda={row['lambda']:g}{density} (val {row['val_macro_f1_mean']:.4f}{seeds})"
        )
    return ", ".join(shown)


def _sweep(cfg: DictConfig, result: dict) -> str:
    root = run_dir(cfg) / "sweep"
    shown = best_lambdas(run_dir(cfg))
    job = f"job {result['job']} " if result.get("job") else "job "
    done = "failed" if result.get("failed") else "done"
    return f"{job}{done}; summary in {root / 'summary.md'}; best so far: {shown or 'none yet'}"


def _report(cfg: DictConfig, m: dict) -> str:
    rows = m.get("metrics", {}).get("n_rows", "?")
    return f"{rows} rows -> {_dirs(cfg)['report'] / 'report.md'} (and report.csv)"


_LINES: dict[str, Callable[[DictConfig, Any], str]] = {
    "data": _data,
    "cpt": _cpt,
    "extract": _extract,
    "merge": _merge,
    "finetune": _finetune,
    "graft": _finetune,  # a graft is a fine-tuned model (init=graft): same line
    "evaluate": _evaluate,
    "prompt": _prompt,
    "sweep": _sweep,
    "pipeline": _report,
    "report": _report,
}


def closing_line(stage: str, cfg: DictConfig, result: Any) -> str | None:
    """One line saying what ``stage`` gave and where it is, or None for stages without one."""
    describe = _LINES.get(stage)
    if describe is None or not isinstance(result, dict):
        return None
    if stage == "evaluate":  # {task: metrics}
        return f"cmmerge evaluate: {describe(cfg, result)}"
    fresh = "up to date (force=true redoes it): " if result.get("skipped") else ""
    return f"cmmerge {stage}: {fresh}{describe(cfg, result)}"
