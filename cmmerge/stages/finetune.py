"""`cmmerge finetune`: sequence classification (token classification for ``task.type=token``)
from init=base|cpt|merged|DIR, full or LoRA, best epoch by validation macro-F1 ->
finetune/<finetune-id>/model/ and metrics.json.

``finetune.sequential=[TASK,...]`` fine-tunes on those tasks first, in order (sequential FT);
``finetune.joint=[TASK,...]`` adds their train sets to the task's (joint FT).
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import DatasetDict, concatenate_datasets
from omegaconf import DictConfig

from cmmerge import dist
from cmmerge.data.tasks import subsample
from cmmerge.data.token_tasks import is_token_task, subsample_sentences
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.baseline import majority_baseline_warning
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.models.loading import local_model_dir
from cmmerge.settings import cache_dir, plain, split_seed, task_config
from cmmerge.stages.chain import require_upstream
from cmmerge.stages.ids import arm_name
from cmmerge.stages.inputs import (
    data_inputs,
    model_source,
    resolve_model,
    task_labels,
    task_splits_with_info,
)
from cmmerge.stages.runner import RunContext, folder_input, run_stage, stage_input
from cmmerge.stages.spec import FinetuneSpec, init_spec
from cmmerge.training.finetune import train_classifier
from cmmerge.training.token_classification import train_token_classifier

log = logging.getLogger("cmmerge")


def init_model(cfg: DictConfig) -> tuple[Path, dict]:
    """The model folder fine-tuning starts from and its manifest input entry."""
    init = str(cfg.init)
    require_upstream(cfg, "finetune")  # every missing stage of the chain, named at once
    if init == "base":
        path = resolve_model(cfg)
        return path, folder_input(path)
    if init in ("cpt", "merged"):  # the stage fine-tuning starts from, by its spec
        start = init_spec(cfg)
        return start.folder / "model", stage_input(start.folder, start.cli_hint())
    path = local_model_dir(init, bool(cfg.get("allow_pickle")))
    return path, folder_input(path)


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


def _data_info(info: dict) -> dict:
    """Per split: rows kept, blank texts dropped and, for a subsampled train split
    (``finetune.train_size``), the size it was drawn from."""
    out = {}
    for split, entry in info.items():
        out[split] = {"size": entry.get("size"), "blank_dropped": entry.get("blank_dropped", 0)}
        if "subsampled_from" in entry:
            out[split]["subsampled_from"] = entry["subsampled_from"]
    return out


def train_size(cfg: DictConfig) -> int | None:
    """``finetune.train_size``: null, or a whole number of training examples >= 1."""
    size = cfg.finetune.get("train_size")
    if size is None:
        return None
    if isinstance(size, bool) or not str(size).isdigit() or int(size) < 1:
        raise CmmergeError(f"finetune.train_size must be a whole number >= 1 or null, got {size!r}")
    return int(size)


def training_data(cfg: DictConfig) -> tuple[DatasetDict, dict]:
    """The task's splits, with the train sets of ``finetune.joint`` tasks added to train, and
    per task what was read (blank texts dropped)."""
    splits, info = task_splits_with_info(cfg)
    size = train_size(cfg)
    if size is not None:
        name = str(cfg.task.name)
        draw = subsample_sentences if is_token_task(plain(cfg.task)) else subsample
        train = draw(splits["train"], int(size), split_seed(cfg), name)
        info["train"] = {
            **info["train"],
            "size": len(train),
            "subsampled_from": len(splits["train"]),
        }
        splits = DatasetDict(train=train, validation=splits["validation"], test=splits["test"])
    infos = {str(cfg.task.name): _data_info(info)}
    joint = [str(t) for t in cfg.finetune.get("joint") or []]
    if joint:
        features = splits["train"].features
        extra = []
        for name in joint:
            other, other_info = task_splits_with_info(cfg, name)
            extra.append(other["train"].cast(features))
            infos[name] = _data_info(other_info)
        train = concatenate_datasets([splits["train"], *extra]).shuffle(seed=int(cfg.seed))
        splits = DatasetDict(train=train, validation=splits["validation"], test=splits["test"])
    return splits, infos


def run(cfg: DictConfig) -> dict:
    spec = FinetuneSpec.from_config(cfg)
    train_size(cfg)  # a bad budget is refused before anything is locked or written
    init_dir, init_input = init_model(cfg)
    labels = task_labels(cfg)  # task.labels, or inferred from the train file
    seed = spec.seed
    sequential, joint = spec.task_list("sequential"), spec.task_list("joint")
    _same_labels(cfg, labels, sequential + joint)
    spec = spec.resolve(init_dir=str(init_dir), labels=labels)
    config_view = spec.config_view()
    peft_cfg = config_view["peft"]

    tokens_cache = cache_dir(cfg)  # tokenize_cached keeps its files in <cache>/tokenized
    # task.type=token: one label per word (cmmerge.training.token_classification)
    fit = train_token_classifier if is_token_task(plain(cfg.task)) else train_classifier

    def work(stage_dir):
        start, steps = init_dir, []
        how = "inferred from the train file" if config_view["labels_inferred"] else "task.labels"
        log.info("labels (%s): %s", how, ", ".join(labels))
        splits, data_info = training_data(cfg)
        for name in sequential:  # earlier tasks first, each from the previous result
            step_dir = stage_dir / "sequential" / name
            step_splits, step_info = task_splits_with_info(cfg, name)
            data_info[name] = _data_info(step_info)
            result = fit(
                start,
                step_splits,
                labels,
                config_view["finetune"],
                step_dir,
                seed,
                peft_cfg,
                tokens_cache,
            )
            steps.append({"task": name, "validation_macro_f1": result["metrics"]["macro_f1"]})
            start = step_dir / "model"
        result = fit(
            start,
            splits,
            labels,
            config_view["finetune"],
            stage_dir,
            seed,
            peft_cfg,
            tokens_cache,
        )
        metrics = result.pop("metrics")
        if not dist.is_main():
            return {"metrics": metrics}
        write_json_atomic(stage_dir / "metrics.json", {"split": "validation", **metrics})
        write_model_card(
            stage_dir / "model",
            spec.folder_id,
            f"Fine-tuned by cmmerge for {cfg.task.name} ({', '.join(labels)}) from "
            f"`{init_dir}`; the epoch kept is the best on validation macro-F1.",
            {
                "arm": arm_name(cfg),
                "init": init_dir,
                "task": cfg.task.name,
                "seed": seed,
                "validation macro-F1": f"{metrics['macro_f1']:.4f}",
                "peft": (peft_cfg or {}).get("name", "none"),
                "lr": cfg.finetune.lr,
                "epochs": cfg.finetune.epochs,
            },
        )
        warning = majority_baseline_warning(
            metrics, labels, config_view["finetune"], pretrained=not model_source(cfg).is_tiny
        )
        return {
            "metrics": metrics,
            "outputs": ["model/", "metrics.json"],
            "baseline_warning": warning,
            **result,
            "sequential_steps": steps,
            "data": data_info,
            "arm": arm_name(cfg),
            "init": str(cfg.init),
            "task": str(cfg.task.name),
            "merge_id": spec.init_id if spec.init == "merged" else None,
        }

    return run_stage(
        RunContext.of(cfg),
        "finetune",
        spec.folder,
        config_view,
        [init_input, *data_inputs(cfg, [str(cfg.task.name), *sequential, *joint])],
        work,
        all_ranks=True,
    )
