"""`cmmerge finetune`: sequence classification (token classification for ``task.type=token``)
from init=base|cpt|merged|DIR, full or LoRA, best epoch by validation macro-F1 ->
finetune/<finetune-id>/model/ and metrics.json.

``finetune.sequential=[TASK,...]`` fine-tunes on those tasks first, in order (sequential FT);
``finetune.joint=[TASK,...]`` adds their train sets to the task's (joint FT).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from datasets import DatasetDict, concatenate_datasets

from cmmerge import dist
from cmmerge.config.specs import FinetuneSpec
from cmmerge.data.tasks import load_task_with_info, subsample
from cmmerge.data.token_tasks import is_token_task, subsample_sentences
from cmmerge.evaluation.baseline import majority_baseline_warning
from cmmerge.io.manifest import write_json_atomic
from cmmerge.io.model_card import write_model_card
from cmmerge.training.finetune import train_classifier
from cmmerge.training.token_classification import train_token_classifier

log = logging.getLogger("cmmerge")


def _data_info(info: dict) -> dict:
    """Per split: rows kept, blank texts dropped and, for a subsampled train split
    (``finetune.train_size``), the size it was drawn from."""
    out = {}
    for split, entry in info.items():
        out[split] = {"size": entry.get("size"), "blank_dropped": entry.get("blank_dropped", 0)}
        if "subsampled_from" in entry:
            out[split]["subsampled_from"] = entry["subsampled_from"]
    return out


@dataclass(frozen=True)
class FinetuneJob:
    """A fine-tune with everything resolved from the command: all that :func:`work` reads.

    Attributes:
        spec: The fine-tune's spec, resolved (the folder it starts from, the labels).
        tasks: The settings of the task and of every sequential or joint task, by name.
        data_root: The folder the task files are read from.
        train_size: ``finetune.train_size`` (checked), or None.
        arm: The arm's name, for the model card and the manifest.
        tokens_cache: Where tokenised splits are cached.
        pretrained: Whether the model is a real pretrained one (not a tiny random one), for the
            majority-class warning.
    """

    spec: FinetuneSpec
    tasks: Mapping[str, Mapping]
    data_root: Path
    train_size: int | None
    arm: str
    tokens_cache: Path
    pretrained: bool

    def splits(self, name: str) -> tuple[DatasetDict, dict]:
        """Train / validation / test of task ``name`` and what was read of each split."""
        task = self.tasks[name]
        splits, info = load_task_with_info(task, self.data_root, seed=self.spec.split_seed)
        return splits.remove_columns("tags"), info


def training_data(job: FinetuneJob) -> tuple[DatasetDict, dict]:
    """The task's splits (its train set drawn down to ``finetune.train_size``), with the train
    sets of ``finetune.joint`` tasks added to train, and per task what was read."""
    name = job.spec.task_name
    splits, info = job.splits(name)
    if job.train_size is not None:
        draw = subsample_sentences if is_token_task(job.tasks[name]) else subsample
        train = draw(splits["train"], job.train_size, job.spec.split_seed, name)
        info["train"] = {
            **info["train"],
            "size": len(train),
            "subsampled_from": len(splits["train"]),
        }
        splits = DatasetDict(train=train, validation=splits["validation"], test=splits["test"])
    infos = {name: _data_info(info)}
    joint = job.spec.task_list("joint")
    if joint:
        features = splits["train"].features
        extra = []
        for other_name in joint:
            other, other_info = job.splits(other_name)
            extra.append(other["train"].cast(features))
            infos[other_name] = _data_info(other_info)
        train = concatenate_datasets([splits["train"], *extra]).shuffle(seed=job.spec.seed)
        splits = DatasetDict(train=train, validation=splits["validation"], test=splits["test"])
    return splits, infos


def work(job: FinetuneJob, stage_dir: Path) -> dict:
    """Fine-tune into ``stage_dir`` (each sequential task first, from the previous result), keep
    the best epoch by validation macro-F1; returns what the manifest records."""
    spec = job.spec
    task, labels, seed = spec.task_name, list(spec.labels), spec.seed
    config_view = spec.config_view()
    peft_cfg, train_cfg = config_view["peft"], config_view["finetune"]
    # task.type=token: one label per word (cmmerge.training.token_classification)
    fit = train_token_classifier if is_token_task(job.tasks[task]) else train_classifier
    start, steps = Path(spec.init_dir), []
    how = "inferred from the train file" if config_view["labels_inferred"] else "task.labels"
    log.info("labels (%s): %s", how, ", ".join(labels))
    splits, data_info = training_data(job)
    for name in spec.task_list("sequential"):  # earlier tasks first, each from the previous
        step_dir = stage_dir / "sequential" / name
        step_splits, step_info = job.splits(name)
        data_info[name] = _data_info(step_info)
        result = fit(
            start, step_splits, labels, train_cfg, step_dir, seed, peft_cfg, job.tokens_cache
        )
        steps.append({"task": name, "validation_macro_f1": result["metrics"]["macro_f1"]})
        start = step_dir / "model"
    result = fit(start, splits, labels, train_cfg, stage_dir, seed, peft_cfg, job.tokens_cache)
    metrics = result.pop("metrics")
    if not dist.is_main():
        return {"metrics": metrics}
    write_json_atomic(stage_dir / "metrics.json", {"split": "validation", **metrics})
    write_model_card(
        stage_dir / "model",
        spec.folder_id,
        f"Fine-tuned by cmmerge for {task} ({', '.join(labels)}) from "
        f"`{spec.init_dir}`; the epoch kept is the best on validation macro-F1.",
        {
            "arm": job.arm,
            "init": spec.init_dir,
            "task": task,
            "seed": seed,
            "validation macro-F1": f"{metrics['macro_f1']:.4f}",
            "peft": (peft_cfg or {}).get("name", "none"),
            "lr": train_cfg["lr"],
            "epochs": train_cfg["epochs"],
        },
    )
    warning = majority_baseline_warning(metrics, labels, train_cfg, pretrained=job.pretrained)
    return {
        "metrics": metrics,
        "outputs": ["model/", "metrics.json"],
        "baseline_warning": warning,
        **result,
        "sequential_steps": steps,
        "data": data_info,
        "arm": job.arm,
        "init": spec.init,
        "task": task,
        "merge_id": spec.init_id if spec.init == "merged" else None,
    }
