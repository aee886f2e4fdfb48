"""How long the stages a plan still has to do will take, from the wall times the finished stages
of the run directory recorded in their manifests: the median of the same stage kind and task (a
fine-tune of as many epochs where the run has such); a CPT by its length, from the seconds a
training step of the finished CPTs took (a 3,000-step CPT is not the 300-step one's time)."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmmerge.config.plan import Step


def _tokens_per_step(section: Any) -> float | None:
    """Sequences x length one optimiser step of a ``cpt`` section trains on (None if unknown)."""
    try:
        accum = int(section.get("grad_accum") or 1)
        return float(int(section["batch_size"]) * accum * int(section["max_length"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def cpt_rate(manifest: dict) -> tuple[float, float] | None:
    """(seconds per training token, seconds outside training) of a finished CPT, from the steps
    its last run made (a resumed one made fewer than its ``steps``); None if not recorded."""
    metrics = manifest.get("metrics") or {}
    steps, runtime = metrics.get("steps"), metrics.get("train_runtime_s")
    tokens = _tokens_per_step((manifest.get("config") or {}).get("cpt"))
    if not isinstance(steps, int) or not isinstance(runtime, int | float) or not tokens:
        return None
    ran = steps - int(metrics.get("resumed_at_step") or 0)
    if ran <= 0 or runtime <= 0:
        return None
    return runtime / (ran * tokens), max(0.0, float(manifest.get("wall_time_s", 0)) - runtime)


def _epochs(config: Any) -> Any:
    """``finetune.epochs`` of a recorded config or a step's config (None if it has none)."""
    return (config.get("finetune") or {}).get("epochs")


def measured(root: Path) -> tuple[dict[tuple, list[float]], list[tuple]]:
    """Wall times of the finished stages of a run directory, by (stage, task), by stage and, for
    fine-tunes, by (stage, task, epochs), and the :func:`cpt_rate` of each finished CPT."""
    from cmmerge.io.manifest import read_manifest

    times: dict[tuple, list[float]] = {}
    rates = []
    for path in root.glob("**/manifest.json"):
        manifest = read_manifest(path.parent)
        if not isinstance(manifest, dict) or manifest.get("status") != "finished":
            continue
        seconds = manifest.get("wall_time_s")
        stage = manifest.get("stage")
        if not isinstance(seconds, int | float) or not stage:
            continue
        times.setdefault((stage, manifest.get("task")), []).append(float(seconds))
        times.setdefault((stage, None), []).append(float(seconds))
        if stage == "finetune":
            key = (stage, manifest.get("task"), _epochs(manifest.get("config") or {}))
            times.setdefault(key, []).append(float(seconds))
        rate = cpt_rate(manifest) if stage == "cpt" else None
        if rate is not None:
            rates.append(rate)
    return times, rates


def _task_of(step: Step) -> str | None:
    return step.eval_task if step.stage == "evaluate" else str(step.cfg.task.name)


def _cpt_seconds(step: Step, rates: list[tuple]) -> float | None:
    """A CPT's time from its steps (``cpt.max_steps``, plus the head warm-up's, counted as
    full steps) and the measured seconds per token; None where it trains by epochs."""
    section = step.cfg.get("cpt") or {}
    steps = section.get("max_steps")
    tokens = _tokens_per_step(section)
    if not rates or not tokens or not isinstance(steps, int) or steps <= 0:
        return None
    steps += int(section.get("head_warmup_steps") or 0)
    per_token = median([r[0] for r in rates])
    return per_token * tokens * steps + median([r[1] for r in rates])


def estimate(
    steps: list[Step], root: Path, found: tuple[dict, list] | None = None
) -> tuple[float, int, int]:
    """Seconds the ``steps`` will take, from the median measured wall time of finished stages
    of the same kind (and task) in ``root``, a CPT by its length (:func:`_cpt_seconds`); also
    how many steps had a measurement and how many had none (left out of the total).
    ``found``: :func:`measured` of ``root`` already read (one pass over its manifests)."""
    times, rates = measured(root) if found is None else found
    total, known, unknown = 0.0, 0, 0
    for step in steps:
        seconds = _cpt_seconds(step, rates) if step.stage == "cpt" else None
        if seconds is None:
            task = _task_of(step)
            values = (
                times.get((step.stage, task, _epochs(step.cfg)))
                or times.get((step.stage, task))
                or times.get((step.stage, None))
            )
            seconds = median(values) if values else None
        if seconds is None:
            unknown += 1
        else:
            total, known = total + seconds, known + 1
    return total, known, unknown


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
