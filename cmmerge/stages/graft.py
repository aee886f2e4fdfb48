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

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from cmmerge import dist
from cmmerge.data.tasks import load_task_with_info
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.io.model_files import (
    WRITE_DTYPES,
    copy_model_files,
    record_dtype,
    record_grown_vocab,
)
from cmmerge.merging.engine import merge_into_base
from cmmerge.merging.extract import TASK_VECTOR_FILE
from cmmerge.settings import data_root, plain
from cmmerge.stages.chain import require_upstream
from cmmerge.stages.ids import arm_name, cli_hint, stage_dirs
from cmmerge.stages.inputs import data_inputs, task_labels
from cmmerge.stages.plan import with_values
from cmmerge.stages.runner import RunContext, run_stage, stage_input
from cmmerge.stages.spec import GRAFT, GraftSpec, onto_task, source_finetune_spec, source_names

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


def _check(cfg: DictConfig, labels: list[str]) -> None:
    if source_names(cfg) != ["cpt"] or cfg.get("weights") is not None:
        raise CmmergeError(
            "cmmerge graft adds tau_cpt alone: leave sources= and weights= unset "
            "(multi-source merges: cmmerge merge sources=[...])"
        )
    if cfg.get("models") or cfg.get("task_vectors") or cfg.get("output") or cfg.get("base"):
        raise CmmergeError(
            "cmmerge graft works in a run directory: base=, models=, task_vectors= and output= "
            "belong to a standalone cmmerge merge"
        )
    if cfg.get("dtype") and str(cfg.dtype) not in WRITE_DTYPES:
        raise CmmergeError(f"dtype={cfg.dtype}: choose one of {', '.join(WRITE_DTYPES)}")
    onto = onto_task(cfg)
    onto_labels = task_labels(cfg, onto)
    if onto_labels != labels:
        raise CmmergeError(
            f"onto={onto} has labels {onto_labels}; {cfg.task.name} has {labels}: the fine-tuned "
            "classifier must predict the code-mixed task's labels"
        )


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


def run(cfg: DictConfig) -> dict:
    cfg = with_values(cfg, init=GRAFT)
    dirs = stage_dirs(cfg)
    labels = task_labels(cfg)
    _check(cfg, labels)
    require_upstream(cfg, "graft")  # cpt, extract and the fine-tune on onto, named at once
    spec = GraftSpec.from_config(cfg)
    source = dirs["onto"]
    hint = source_finetune_spec(cfg, spec.onto).cli_hint()
    if not (source / "model").exists() and transaction.pruned_output(source / "model"):
        raise CmmergeError(
            f"{source}/model was deleted after use (keep_models=false): run `{hint} force=true` "
            "to make it again"
        )
    inputs = [
        stage_input(source, hint),
        stage_input(dirs["extract"], cli_hint(cfg, "extract")),
        *data_inputs(cfg, [str(cfg.task.name)]),
    ]
    spec = spec.resolve(labels=labels)
    job = GraftJob(
        spec,
        finetuned=source / "model",
        task_vector=dirs["extract"] / TASK_VECTOR_FILE,
        task=plain(cfg.task),
        data_root=data_root(cfg),
        batch_size=int(cfg.evaluate.batch_size),
        max_length=int(cfg.evaluate.max_length),
        arm=arm_name(cfg),
        allow_nonfinite=bool(cfg.get("allow_nonfinite")),
    )
    return run_stage(RunContext.of(cfg), spec, inputs, functools.partial(work, job))
