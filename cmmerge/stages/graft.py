"""`cmmerge graft`: task arithmetic after fine-tuning, for tasks without code-mixed labels.

``theta = theta_ft + lambda * tau_cpt``: the base fine-tuned on ``onto`` (labelled data in one
language, e.g. ``english-sentiment-en-hi``) gets the CPT task vector added, with no further
training, and is scored on the validation split of the code-mixed ``task`` (which picks lambda;
test is only scored by ``cmmerge evaluate init=graft ...``).

Only the tensors tau_cpt covers change (the backbone; float32 math, written in float32 unless
``dtype=`` asks otherwise); the fine-tuned classifier head and every tensor only the fine-tuned
model has are copied unchanged. ``method=ties|dare_*`` trims tau_cpt first, as a merge would.

The result is a fine-tuned model like any other: ``finetune/<graft-id>/model/``,
``metrics.json`` (validation, code-mixed task) and a manifest with the fields ``evaluate``,
``report`` and ``status`` read (``arm``, ``init``, ``task``, ``merge_id``), so that
``cmmerge evaluate init=graft onto=TASK method=... lambda=...`` and ``cmmerge report`` treat it
as one more fine-tune, and the report chooses its lambda on validation like a merge's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from cmmerge import dist
from cmmerge.config.specs import GRAFT, GraftSpec
from cmmerge.data.tasks import load_task_with_info
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.io.model_files import (
    copy_model_files,
    record_dtype,
    record_grown_vocab,
)
from cmmerge.merging.engine import merge_into_base

log = logging.getLogger("cmmerge")


def graft_weights(
    finetuned, task_vector, scale: float, out_dir, method: str = "task_arithmetic", **options
) -> dict:
    """Write ``finetuned + scale * combine(method, [tau])`` into ``out_dir`` (weights only).

    Args:
        finetuned: HF folder of the fine-tuned classifier (its heads are kept unchanged).
        task_vector: ``task_vector.safetensors`` written by ``extract`` (backbone names).
        scale: lambda.
        out_dir: folder for the weights.
        method: merge method applied to the single task vector (task_arithmetic: tau as is).
        **options: method parameters and ``dtype`` etc., as :func:`merge_into_base` takes.

    Returns:
        The merge engine's stats (``n_merged``, ``heads_copied``, ``base_only``, ``dtype``...).
    """
    return merge_into_base(finetuned, [task_vector], [1.0], method, scale, out_dir, **options)


@dataclass(frozen=True)
class GraftJob:
    """A graft with everything resolved from the command: all that :func:`work` reads.

    Attributes:
        spec: The graft's spec (onto, the merge of tau_cpt, the task, the seed; labels
            resolved).
        finetuned: The model fine-tuned on ``onto`` that gets tau_cpt.
        task_vector: The run's ``task_vector.safetensors``.
        task: The code-mixed task's settings (its validation split is scored).
        data_root: The folder the task files are read from.
        batch_size: ``evaluate.batch_size`` for the validation predictions.
        max_length: ``evaluate.max_length``.
        arm: The arm's name, for the model card and the manifest.
        allow_nonfinite: Write NaN or Inf values rather than refuse them.
    """

    spec: GraftSpec
    finetuned: Path
    task_vector: Path
    task: Mapping
    data_root: Path
    batch_size: int
    max_length: int
    arm: str
    allow_nonfinite: bool = False


def work(job: GraftJob, stage_dir: Path) -> dict:
    """Graft into ``stage_dir`` and score the code-mixed task's validation split; returns what
    the manifest records."""

    from cmmerge.training.finetune import predict

    spec, finetuned = job.spec, job.finetuned
    onto, scale, method = spec.onto, spec.merge.scale, spec.merge.method
    params, labels, task = dict(spec.merge.params), list(spec.labels), str(job.task["name"])
    model_dir = stage_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        stats = graft_weights(
            finetuned,
            job.task_vector,
            scale,
            model_dir,
            method,
            dtype=spec.merge.dtype or None,
            allow_nonfinite=job.allow_nonfinite,
            **params,
        )
        copy_model_files(finetuned, model_dir)
        record_dtype(model_dir, stats["dtype"])
        if stats["grown"]:  # CPT grew the vocabulary: config.json says the new size
            record_grown_vocab(model_dir, [], stats["grown"])
    dist.barrier()
    splits, info = load_task_with_info(job.task, job.data_root, seed=spec.split_seed)
    val = splits["validation"]
    _, metrics = predict(
        model_dir,
        list(val["text"]),
        labels,
        job.batch_size,
        job.max_length,
        list(val["label"]),
        stage_dir / ".predict",
    )
    if not dist.is_main():
        return {"metrics": metrics}
    write_json_atomic(stage_dir / "metrics.json", {"split": "validation", **metrics})
    record = {
        "onto": onto,
        "finetuned": str(finetuned),
        "task_vector": str(job.task_vector),
        "method": method,
        "lambda": scale,
        **params,
        "dtype": stats["dtype"],
        "n_merged": stats["n_merged"],
        "kept_from_the_finetuned_model": stats["heads_copied"] + stats["base_only"],
    }
    (model_dir / "graft.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    write_model_card(
        model_dir,
        spec.folder_id,
        f"`{finetuned}` (fine-tuned on {onto}) plus {scale:g} x tau_cpt "
        f"({method}), for {task} without code-mixed labels; not trained further.",
        {
            "arm": job.arm,
            "task": task,
            "seed": spec.seed,
            f"validation macro-F1 ({task})": f"{metrics['macro_f1']:.4f}",
            "tensors with tau_cpt added": stats["n_merged"],
            "kept unchanged (heads, tensors tau_cpt lacks)": len(
                record["kept_from_the_finetuned_model"]
            ),
            "dtype": stats["dtype"],
        },
    )
    log.info("graft %s: validation macro-F1 %.4f on %s", spec.folder_id, metrics["macro_f1"], task)
    return {
        "metrics": metrics,
        "outputs": ["model/", "metrics.json"],
        "arm": job.arm,
        "init": GRAFT,
        "task": task,
        "onto": onto,
        "onto_finetune_id": spec.onto_finetune,
        "merge_id": spec.merge.folder_id,
        "graft": {k: v for k, v in stats.items() if k != "files"},
        "data": {"validation": info["validation"]},
    }
