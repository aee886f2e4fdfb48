"""The splits of a task config, shared by sequence (:mod:`cmmerge.data.tasks`) and token-level
(:mod:`cmmerge.data.token_tasks`) tasks: which file holds each split and which are carved."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cmmerge.errors import CmmergeError

SPLITS = ("train", "validation", "test")
CARVED = ("validation", "test")  # the splits that may be carved out of train


def config_root(cfg: Mapping, data_root: str | Path) -> Path:
    """The folder a task's or corpus's files are relative to: its own ``root``, else the data
    root (``data.root``)."""
    return Path(cfg["root"]).expanduser() if cfg.get("root") else Path(data_root)


def split_file(cfg: Mapping, split: str) -> str | None:
    """The file of ``split`` (``train`` | ``validation`` | ``test`` | ``test_labels``), if any."""
    return cfg.get(split) or cfg.get(f"{split}_file") or None


def carve_fraction(cfg: Mapping, key: str) -> float | None:
    """The fraction ``cfg[key]`` (e.g. ``test_fraction``) in (0, 1), or None when unset."""
    value = cfg.get(key)
    if value is None:
        return None
    if not 0 < float(value) < 1:
        raise CmmergeError(f"task {cfg.get('name')}: {key} must be in (0, 1), got {value}")
    return float(value)


def carve_fractions(cfg: Mapping, has: Mapping[str, bool]) -> dict[str, float | None]:
    """The carve-out fraction of each of validation / test, checked against the splits that
    ``has`` a file: a split with neither a file nor a fraction, or carved fractions summing to
    1 or more, is refused."""
    name = cfg.get("name")
    fractions = {s: carve_fraction(cfg, f"{s}_fraction") for s in CARVED}
    for split in CARVED:
        if not has[split] and fractions[split] is None:
            raise CmmergeError(
                f"task {name}: no {split} split: set task.{split}=PATH or "
                f"task.{split}_fraction=F (carved out of train)"
            )
    if not has["test"] and not has["validation"]:
        if fractions["test"] + fractions["validation"] >= 1:  # type: ignore[operator]
            raise CmmergeError(f"task {name}: validation_fraction + test_fraction must be < 1")
    return fractions
