"""Training budgets of a CPU-sized study: ``finetune.train_size`` trains on a seeded, stratified
subset (the same for every training seed), and the kept epoch's validation metrics come from the
Trainer's own evaluation, equal to a fresh prediction with the kept model."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import pytest
from conftest import FAST, compose
from small_task import small_task

from cmmerge.commands import finetune
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import task_splits
from cmmerge.data.tasks import subsample
from cmmerge.errors import CmmergeError
from cmmerge.training.finetune import predict

SMALL = [*FAST, "finetune.batch_size=8", "init=base", "finetune.epochs=2"]


def _labelled(n: int) -> datasets.Dataset:
    features = datasets.Features(
        text=datasets.Value("string"), label=datasets.ClassLabel(names=["a", "b", "c"])
    )
    labels = [0] * (n // 2) + [1] * (n // 3) + [2] * (n - n // 2 - n // 3)
    return datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(n)], "label": labels}, features=features
    )


def test_subsample_is_stratified_seeded_and_a_no_op_when_not_smaller():
    ds = _labelled(600)
    a, b = subsample(ds, 60, seed=0, name="t"), subsample(ds, 60, seed=0, name="t")
    assert len(a) == 60 and a["text"] == b["text"]
    assert Counter(a["label"]) == {0: 30, 1: 20, 2: 10}  # the file's proportions
    assert subsample(ds, 60, seed=1, name="t")["text"] != a["text"]
    assert subsample(ds, None, seed=0, name="t") is ds
    assert subsample(ds, 600, seed=0, name="t") is ds
    with pytest.raises(CmmergeError, match="train_size must be >= 1"):
        subsample(ds, 0, seed=0, name="t")


def test_train_size_trains_on_the_subset_and_names_a_new_folder(tmp_path):
    task = small_task(tmp_path / "task", n_train=48)
    base = [f"run.root={tmp_path}", "run.name=r", *SMALL, *task]
    cfg = compose("finetune", [*base, "finetune.train_size=16"])
    finetune.run(cfg)
    out = stage_dirs(cfg)["finetune"]
    manifest = json.loads((out / "manifest.json").read_text())
    train_info = manifest["data"][cfg.task.name]["train"]
    assert train_info == {"size": 16, "blank_dropped": 0, "subsampled_from": 48}
    assert manifest["steps"] == 4  # 2 epochs of 16 examples in batches of 8
    full = stage_dirs(compose("finetune", base))["finetune"]
    assert full != out  # another budget, another folder


def test_kept_epoch_metrics_equal_a_fresh_evaluation(tmp_path):
    task = small_task(tmp_path / "task")
    cfg = compose("finetune", [f"run.root={tmp_path}", "run.name=r", *SMALL, *task])
    finetune.run(cfg)
    out = stage_dirs(cfg)["finetune"]
    kept = json.loads((out / "metrics.json").read_text())
    validation = task_splits(cfg)["validation"]
    _, fresh = predict(
        out / "model",
        list(validation["text"]),
        list(cfg.task.labels),
        8,
        32,
        list(validation["label"]),
        tmp_path / "predict",
    )
    assert kept["confusion_matrix"] == fresh["confusion_matrix"]
    assert kept["macro_f1"] == pytest.approx(fresh["macro_f1"], abs=1e-12)
    assert kept["loss"] == pytest.approx(fresh["loss"], rel=1e-4)
