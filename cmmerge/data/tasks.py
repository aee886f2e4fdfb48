"""Labelled task data: ``load_task`` builds train/validation/test splits from a task config.

A task config (``configs/task/<name>.yaml``) has the keys ``name``, ``format``
(``sentimix_conll``), ``labels`` (ordered; label id = index), ``fix_mojibake``, ``train_file``,
``validation_file`` or ``validation_fraction`` (exactly one), ``test_file`` and optionally
``test_labels_file`` (a ``Uid,Sentiment`` CSV for an unlabelled test file). File paths are relative
to the data root (``data.root``).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import ftfy

from cmmerge.data.formats import (
    SentimixRecord,
    parse_sentimix_conll,
    read_labels_csv,
    resolve_path,
)
from cmmerge.errors import CmmergeError

TASK_FORMATS = ("sentimix_conll",)
SPLITS = ("train", "validation", "test")
# Repair mojibake but leave clean text alone (the default config would also uncurl quotes).
_FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False)


def samples_root() -> Path:
    """Return the folder of the data samples shipped inside the package (the default data root)."""
    return Path(str(importlib.resources.files("cmmerge") / "samples"))


def as_dict(cfg: Mapping) -> dict[str, Any]:
    """Return a plain ``dict`` copy of a config (a Hydra ``DictConfig`` is resolved first)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def task_labels(task_cfg: Mapping) -> list[str]:
    """Return the task's ordered label list, checking it is a non-empty list of unique names."""
    cfg = as_dict(task_cfg)
    labels = cfg.get("labels")
    name = cfg.get("name", "?")
    if not isinstance(labels, list) or not labels:
        raise CmmergeError(f"task {name}: 'labels' must be a non-empty list of label names")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise CmmergeError(f"task {name}: 'labels' has duplicates: {labels}")
    return labels


def _read_split(
    cfg: dict[str, Any], key: str, data_root: str | Path, labels_key: str | None = None
) -> tuple[list[str], list[str], Path]:
    """Read one split file of a task: (texts, label strings, path)."""
    name = cfg["name"]
    path = resolve_path(data_root, cfg[key], f"task {name}, key {key}")
    records: list[SentimixRecord] = parse_sentimix_conll(path, f"task {name}, key {key}")
    label_of = {r.uid: r.label for r in records}
    if labels_key and cfg.get(labels_key):
        where = f"task {name}, key {labels_key}"
        csv_path = resolve_path(data_root, cfg[labels_key], where)
        csv_labels = read_labels_csv(csv_path, where)
        missing = [r.uid for r in records if r.uid not in csv_labels]
        if missing:
            raise CmmergeError(
                f"{csv_path}: no label for {len(missing)} uid(s) of {path}, "
                f"e.g. {missing[:5]} ({where})"
            )
        label_of = {r.uid: csv_labels[r.uid] for r in records}
    unlabelled = [r for r in records if label_of[r.uid] is None]
    if unlabelled:
        r = unlabelled[0]
        raise CmmergeError(
            f"{path} line {r.line}: tweet {r.uid} has no label and the config gives no labels "
            f"file ({len(unlabelled)} unlabelled; task {name}, key {key})"
        )
    texts = [r.text for r in records]
    if cfg.get("fix_mojibake"):
        texts = [ftfy.fix_text(t, _FTFY_CONFIG) for t in texts]
    return texts, [str(label_of[r.uid]) for r in records], path


def _to_dataset(
    texts: list[str], labels: list[str], names: list[str], path: Path
) -> datasets.Dataset:
    """Build a ``text``/``label`` dataset, mapping label strings to ids in ``names``."""
    bad = sorted(set(labels) - set(names))
    if bad:
        raise CmmergeError(f"unknown label(s) {bad} in {path} (the task's labels are {names})")
    index = {label: i for i, label in enumerate(names)}
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict(
        {"text": texts, "label": [index[label] for label in labels]}, features=features
    )


def _check_config(cfg: dict[str, Any]) -> None:
    """Raise a CmmergeError naming the first missing or inconsistent task config key."""
    name = cfg.get("name") or "?"
    for key in ("name", "train_file", "test_file"):
        if not cfg.get(key):
            raise CmmergeError(f"task {name}: config key '{key}' is missing")
    fmt = cfg.get("format", "sentimix_conll")
    if fmt not in TASK_FORMATS:
        raise CmmergeError(f"task {name}: unknown format {fmt!r} (known: {list(TASK_FORMATS)})")
    fraction = cfg.get("validation_fraction")
    if bool(cfg.get("validation_file")) == (fraction is not None):
        raise CmmergeError(
            f"task {name}: set exactly one of 'validation_file' and 'validation_fraction'"
        )
    if fraction is not None and not 0 < float(fraction) < 1:
        raise CmmergeError(f"task {name}: validation_fraction must be in (0, 1), got {fraction}")


def load_task(task_cfg: Mapping, data_root: str | Path, seed: int = 0) -> datasets.DatasetDict:
    """Load a labelled task as splits ``train``, ``validation`` and ``test``.

    Args:
        task_cfg: The task config (``cfg.task``).
        data_root: Folder the config's file paths are relative to (``data.root``).
        seed: Seed of the stratified validation carve-out when the config has
            ``validation_fraction``; the same seed always gives the same split. Pass a constant
            (not the training seed) to keep one validation set across training seeds.

    Returns:
        A ``DatasetDict`` whose splits have the columns ``text`` (str) and ``label`` (int, a
        ``ClassLabel`` over ``task_cfg['labels']``).

    Raises:
        CmmergeError: On a bad config, a missing, empty or undecodable file, or unknown labels.
    """
    cfg = as_dict(task_cfg)
    _check_config(cfg)
    names = task_labels(cfg)
    split = {}
    texts, labels, path = _read_split(cfg, "train_file", data_root)
    train = _to_dataset(texts, labels, names, path)
    fraction = cfg.get("validation_fraction")
    if fraction is not None:
        try:
            parts = train.train_test_split(
                test_size=float(fraction), stratify_by_column="label", seed=seed
            )
        except ValueError as err:
            raise CmmergeError(
                f"task {cfg['name']}: cannot carve a stratified {fraction} validation split from "
                f"{path} (label counts {label_counts(train, names)}): {err}"
            ) from None
        split["train"], split["validation"] = parts["train"], parts["test"]
    else:
        split["train"] = train
        texts, labels, path = _read_split(cfg, "validation_file", data_root)
        split["validation"] = _to_dataset(texts, labels, names, path)
    texts, labels, path = _read_split(cfg, "test_file", data_root, "test_labels_file")
    split["test"] = _to_dataset(texts, labels, names, path)
    return datasets.DatasetDict({name: split[name] for name in SPLITS})


def label_counts(ds: datasets.Dataset, labels: list[str]) -> dict[str, int]:
    """Count the examples of each label (in ``labels`` order, zeros included)."""
    counts = dict.fromkeys(labels, 0)
    for label_id in ds["label"]:
        counts[labels[label_id]] += 1
    return counts


def label_distribution(ds: datasets.DatasetDict, labels: list[str]) -> dict:
    """Return ``{split: {label: count}}`` for every split of ``ds``."""
    return {name: label_counts(split, list(labels)) for name, split in ds.items()}
