"""`cmmerge extract`: task vector tau = theta_cpt - theta_base over backbone parameters.

Writes ``task_vector.safetensors`` (float32, or ``dtype=bfloat16``/``float16``), ``stats.json``
(per-tensor L2 norm and fraction changed, per-layer totals, and the cosine with every
``task_vectors=[FILE,...]`` given for comparison) and ``norm_by_layer.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmmerge.config.specs import ExtractSpec
from cmmerge.io.manifest import write_json_atomic
from cmmerge.merging.extract import TASK_VECTOR_FILE, extract_task_vector, task_vector_cosines

PLOT_FILE = "norm_by_layer.png"


@dataclass(frozen=True)
class ExtractJob:
    """An extraction with everything resolved from the command: all that :func:`work` reads.

    Attributes:
        spec: The extraction's spec (the CPT it reads, the dtype written).
        base: The base model folder.
        others: Task-vector files the new one is compared with (cosines).
        allow_pickle: Pickle weights may be read.
    """

    spec: ExtractSpec
    base: Path
    others: tuple[Path, ...] = ()
    allow_pickle: bool = False


def work(job: ExtractJob, stage_dir: Path) -> dict:
    """Write tau = theta_cpt - theta_base, its statistics and plot into ``stage_dir``."""
    from cmmerge.reporting.plots import plot_norm_by_layer

    spec, others = job.spec, list(job.others)
    dtype = spec.dtype or "float32"
    out = stage_dir / TASK_VECTOR_FILE
    stats = extract_task_vector(
        job.base, spec.cpt.folder / "model", out, dtype=dtype, allow_pickle=job.allow_pickle
    )
    final = spec.folder / TASK_VECTOR_FILE  # where the file is once the stage finished
    stats["file"] = str(final)
    if others:
        cos = task_vector_cosines([out, *others])
        stats["cosine"] = {"files": [str(final), *map(str, others)], "matrix": cos}
    write_json_atomic(stage_dir / "stats.json", stats)
    plot_norm_by_layer(stats["per_layer"], stage_dir / PLOT_FILE)
    metrics = {k: stats[k] for k in ("n_tensors", "n_params", "l2_norm") if k in stats}
    if others:
        metrics["cosine_with"] = cos[0][1:]
    return {"metrics": metrics, "outputs": [TASK_VECTOR_FILE, "stats.json", PLOT_FILE]}
