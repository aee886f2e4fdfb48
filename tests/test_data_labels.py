"""Data-layer fixes of issue 10: label sets inferred from the train file, blank texts dropped
with a count, and a tokenisation cache that does not hand back old labels."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from conftest import FAST, compose
from small_task import rows, small_task, write_csv

from cmmerge.commands import finetune
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import resolve_model
from cmmerge.data import load_task_with_info
from cmmerge.data.corpus import load_task_config
from cmmerge.data.stats import tokenize_cached
from cmmerge.errors import CmmergeError
from cmmerge.models.loading import load_tokenizer


def custom(tmp_path: Path, **overrides: object) -> dict:
    cfg = {**load_task_config("custom"), "root": None}
    cfg.update(overrides)
    return cfg


def test_labels_are_inferred_sorted_from_train_unless_listed(tmp_path, caplog):
    train = write_csv(tmp_path / "train.csv", rows(12, labels=("pos", "neg", "mid")))
    val = write_csv(tmp_path / "val.csv", rows(6, seed=1, labels=("neg", "pos", "mid")))
    cfg = custom(tmp_path, train=str(train), validation=str(val), test_fraction=0.25)
    assert cfg["labels"] is None  # the shipped custom task infers them
    with caplog.at_level("INFO", logger="cmmerge"):
        splits, _ = load_task_with_info(cfg, tmp_path)
    assert splits["train"].features["label"].names == ["mid", "neg", "pos"]
    assert "labels inferred from" in caplog.text and "mid, neg, pos" in caplog.text
    val_labels = [
        splits["validation"].features["label"].names[i] for i in splits["validation"]["label"]
    ]
    assert val_labels == ["neg", "pos", "mid", "neg", "pos", "mid"]
    # an explicit list wins, in its order
    listed, _ = load_task_with_info({**cfg, "labels": ["pos", "neg", "mid"]}, tmp_path)
    assert listed["train"].features["label"].names == ["pos", "neg", "mid"]
    # label_map applies before inference; a null target drops the rows
    mapped, _ = load_task_with_info({**cfg, "label_map": {"mid": None}}, tmp_path)
    assert mapped["train"].features["label"].names == ["neg", "pos"]


def test_a_label_only_in_validation_is_refused_with_its_lines(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(8))
    val = write_csv(tmp_path / "val.csv", [("a b c", "pos"), ("d e f", "joy"), ("g", "joy")])
    cfg = custom(tmp_path, train=str(train), validation=str(val), test_fraction=0.25)
    with pytest.raises(CmmergeError) as err:
        load_task_with_info(cfg, tmp_path)
    assert f"unknown label(s) 'joy' (2x, line(s) 3, 4) in {val}" in str(err.value)
    assert "the task's labels are ['neg', 'pos']" in str(err.value)


def test_a_train_file_with_one_label_is_refused(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(6, labels=("pos",)))
    with pytest.raises(CmmergeError, match="every row of .* has the label 'pos'"):
        load_task_with_info(custom(tmp_path, train=str(train), test_fraction=0.3), tmp_path)


def test_blank_texts_are_dropped_and_counted(tmp_path, caplog):
    data = rows(12)
    data[2], data[5] = ("   ", data[2][1]), ("", data[5][1])
    train = write_csv(tmp_path / "train.csv", data)
    test = write_csv(tmp_path / "test.csv", [*rows(4, seed=1), (" ", "neg")])
    cfg = custom(tmp_path, train=str(train), test=str(test), labels=["neg", "pos"])
    with caplog.at_level("WARNING", logger="cmmerge"):
        splits, info = load_task_with_info({**cfg, "validation_fraction": 0.2}, tmp_path)
    assert info["train"]["blank_dropped"] == 2 and info["test"]["blank_dropped"] == 1
    assert info["train"]["labelled"] == 10 and len(splits["test"]) == 4
    assert all(t.strip() for split in splits.values() for t in split["text"])
    assert "train: 2 row(s) with blank text dropped" in caplog.text


def test_a_split_of_blank_texts_is_one_clear_error(tmp_path):
    blank = write_csv(tmp_path / "train.csv", [(" ", "pos"), ("", "neg"), ("\t", "pos")])
    for labels in (None, ["neg", "pos"]):  # inferred or listed
        cfg = custom(tmp_path, train=str(blank), test_fraction=0.2, labels=labels)
        with pytest.raises(CmmergeError) as err:
            load_task_with_info(cfg, tmp_path)
        assert str(err.value) == (
            f"task custom: split train ({blank}) has no examples left "
            "(3 row(s) with blank text dropped)"
        )


def test_tokenisation_cache_keeps_the_new_labels_of_the_same_texts(tmp_path):
    tokenizer = load_tokenizer(resolve_model(compose("finetune", [])))
    texts = [text for text, _ in rows(10)]
    old = datasets.Dataset.from_dict({"text": texts, "label": [0] * 10})
    new = datasets.Dataset.from_dict({"text": texts, "label": [1] * 10})
    first = tokenize_cached(old, tokenizer, 16, tmp_path)
    again = tokenize_cached(new, tokenizer, 16, tmp_path)  # the same texts: tokens from cache
    assert first["label"] == [0] * 10 and again["label"] == [1] * 10
    assert again["input_ids"] == first["input_ids"]
    assert len(list((tmp_path / "tokenized").glob("tokens-*.arrow"))) == 1


def test_a_relabelled_custom_task_trains_on_its_new_labels(tmp_path, caplog):
    task = [o for o in small_task(tmp_path / "task") if not o.startswith("task.labels")]
    args = [f"run.root={tmp_path}", *FAST, "finetune.max_steps=2", "finetune.batch_size=8"]
    args += ["init=base", *task]
    cfg = compose("finetune", args)
    with caplog.at_level("INFO", logger="cmmerge"):
        first = finetune.run(cfg)
    assert first["config"]["labels"] == ["neg", "pos"] and first["config"]["labels_inferred"]
    assert "labels inferred from" in caplog.text
    metrics = stage_dirs(cfg)["finetune"] / "metrics.json"
    log = (metrics.parent / "finetune.log").read_text()
    assert "labels (inferred from the train file): neg, pos" in log

    def support() -> dict[str, int]:
        per_class = json.loads(metrics.read_text())["per_class"]
        return {label: entry["support"] for label, entry in per_class.items()}

    assert support() == {"neg": 8, "pos": 8}
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1)):  # same texts, new labels
        relabelled = [
            (text, "pos" if i % 4 == 0 else "neg") for i, (text, _) in enumerate(rows(n, seed))
        ]
        write_csv(tmp_path / "task" / f"{split}.csv", relabelled)
    finetune.run(compose("finetune", [*args, "force=true"]))
    assert support() == {"neg": 12, "pos": 4}
