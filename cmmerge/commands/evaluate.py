"""``cmmerge evaluate``: the command's config read once into the typed job of
:mod:`cmmerge.stages.evaluate` (every input resolved and checked), then run."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from cmmerge.config.chain import require_upstream
from cmmerge.config.inputs import data_inputs, task_labels
from cmmerge.config.specs import EvaluateSpec, thaw
from cmmerge.config.values import run_context
from cmmerge.data.token_tasks import is_token_task
from cmmerge.errors import CmmergeError
from cmmerge.presets import plain
from cmmerge.stages.evaluate import work
from cmmerge.stages.runner import run_stage, stage_input


def eval_task_names(cfg: DictConfig) -> list[str]:
    """The tasks scored: ``eval_tasks``, or the task fine-tuned on."""
    return [str(t) for t in (cfg.get("eval_tasks") or [cfg.task.name])]


def evaluate_one(cfg: DictConfig, task_name: str) -> dict:
    """Evaluate the configured fine-tuned model on the test split of ``task_name``."""
    spec = EvaluateSpec.from_config(cfg, task_name)
    ft_dir, ft_id = spec.model.folder, spec.model.folder_id
    hint = spec.model.cli_hint()
    require_upstream(cfg, "evaluate")  # every missing stage of the chain, named at once
    inputs = [stage_input(ft_dir, hint), *data_inputs(cfg, [task_name])]
    task = spec.task
    labels = task_labels(cfg)  # what fine-tuning used: task.labels, or inferred from train
    eval_labels = labels if task_name == str(cfg.task.name) else task_labels(cfg, task_name)
    token = is_token_task(thaw(task))
    if token != is_token_task(plain(cfg.task)):
        raise CmmergeError(
            f"eval task {task_name} is {'token' if token else 'sentence'}-level, the model "
            f"{ft_id} was trained on {cfg.task.name}, which is not"
        )
    if eval_labels != labels:
        raise CmmergeError(
            f"eval task {task_name} has labels {eval_labels}, the model "
            f"{ft_id} was trained on {labels}"
        )
    spec = spec.resolve(labels=labels)
    return run_stage(run_context(cfg), spec, inputs, functools.partial(work, spec))


def run(cfg: DictConfig) -> dict:
    """Score the configured fine-tune on the test split of every evaluation task."""
    results = {name: evaluate_one(cfg, name) for name in eval_task_names(cfg)}
    return {name: r["metrics"] for name, r in results.items()}
