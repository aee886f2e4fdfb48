"""``cmmerge graft``: the command's config read once into the typed job of
:mod:`cmmerge.stages.graft` (every input resolved and checked), then run."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from cmmerge.config.chain import require_upstream
from cmmerge.config.ids import arm_name, cli_hint, stage_dirs
from cmmerge.config.inputs import data_inputs, task_labels
from cmmerge.config.plan import with_values
from cmmerge.config.specs import GRAFT, GraftSpec, onto_task, source_finetune_spec, source_names
from cmmerge.config.values import data_root, run_context
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.merging.extract import TASK_VECTOR_FILE
from cmmerge.presets import plain
from cmmerge.stages.graft import GraftJob, work
from cmmerge.stages.runner import run_stage, stage_input


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
    onto = onto_task(cfg)
    onto_labels = task_labels(cfg, onto)
    if onto_labels != labels:
        raise CmmergeError(
            f"onto={onto} has labels {onto_labels}; {cfg.task.name} has {labels}: the fine-tuned "
            "classifier must predict the code-mixed task's labels"
        )


def run(cfg: DictConfig) -> dict:
    """tau_cpt added to the model fine-tuned on ``onto=TASK`` (no code-mixed labels)."""
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
    return run_stage(run_context(cfg), spec, inputs, functools.partial(work, job))
