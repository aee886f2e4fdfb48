"""``cmmerge finetune``: the command's config read once into the typed job of
:mod:`cmmerge.stages.finetune` (every input resolved and checked), then run."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from cmmerge.config.ids import arm_name
from cmmerge.config.inputs import data_inputs, init_model, model_source, task_labels
from cmmerge.config.specs import FinetuneSpec
from cmmerge.config.values import cache_dir, data_root, run_context, task_config
from cmmerge.data.token_tasks import is_token_task
from cmmerge.errors import CmmergeError
from cmmerge.presets import plain
from cmmerge.stages.finetune import FinetuneJob, work
from cmmerge.stages.runner import run_stage


def _same_labels(cfg: DictConfig, labels: list[str], names: list[str]) -> None:
    token = is_token_task(plain(cfg.task))
    for name in names:
        if is_token_task(plain(task_config(cfg, name))) != token:
            kind = "token-level" if token else "sentence-level"
            raise CmmergeError(
                f"task {name} is not {kind} like {cfg.task.name}: sequential and joint "
                "fine-tuning need tasks of one type (task.type)"
            )
        other = task_labels(cfg, name)
        if other != labels:
            raise CmmergeError(
                f"task {name} has labels {other}; {cfg.task.name} has {labels}: "
                "sequential and joint fine-tuning need the same label set"
            )


def train_size(cfg: DictConfig) -> int | None:
    """``finetune.train_size``: null, or a whole number of training examples >= 1."""
    size = cfg.finetune.get("train_size")
    if size is None:
        return None
    if isinstance(size, bool) or not str(size).isdigit() or int(size) < 1:
        raise CmmergeError(f"finetune.train_size must be a whole number >= 1 or null, got {size!r}")
    return int(size)


def run(cfg: DictConfig) -> dict:
    """Fine-tune a classifier from ``init=base|cpt|merged|DIR`` on the configured task."""
    spec = FinetuneSpec.from_config(cfg)
    size = train_size(cfg)  # a bad budget is refused before anything is locked or written
    init_dir, init_input = init_model(cfg)
    labels = task_labels(cfg)  # task.labels, or inferred from the train file
    sequential, joint = spec.task_list("sequential"), spec.task_list("joint")
    _same_labels(cfg, labels, sequential + joint)
    spec = spec.resolve(init_dir=str(init_dir), labels=labels)
    names = [str(cfg.task.name), *sequential, *joint]
    job = FinetuneJob(
        spec,
        tasks={name: plain(task_config(cfg, name)) for name in names},
        data_root=data_root(cfg),
        train_size=size,
        arm=arm_name(cfg),
        tokens_cache=cache_dir(cfg),  # tokenize_cached keeps its files in <cache>/tokenized
        pretrained=not model_source(cfg).is_tiny,
    )
    return run_stage(
        run_context(cfg),
        spec,
        [init_input, *data_inputs(cfg, names)],
        functools.partial(work, job),
    )
