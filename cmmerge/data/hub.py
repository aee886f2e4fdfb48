"""Hugging Face hub data sets as task splits (``task.hub=NAME``); one clear error when offline."""

from __future__ import annotations

from typing import Any

from cmmerge.data.tables import Row
from cmmerge.errors import CmmergeError

_cache: dict[tuple[str, str | None], Any] = {}


def load_hub_dataset(name: str, config: str | None):
    """``datasets.load_dataset(name, config)`` (all splits), cached per process.

    Raises:
        CmmergeError: When the hub is unreachable (offline machine, ``HF_DATASETS_OFFLINE``) or
            the data set does not exist.
    """
    key = (name, config)
    if key not in _cache:
        import datasets

        try:
            _cache[key] = datasets.load_dataset(name, config)
        except Exception as err:  # noqa: BLE001 - any hub failure becomes one line
            reason = " ".join(str(err).split())[:200]
            raise CmmergeError(
                f"cannot load hub data set {name!r}"
                f"{f' (config {config!r})' if config else ''}: {type(err).__name__}: {reason}; "
                "the hub may be unreachable: download it where you are online or pass local "
                "files (task=custom task.train=PATH ...)"
            ) from None
    return _cache[key]


def hub_rows(
    name: str, config: str | None, split: str, text_column: str, label_column: str, what: str
) -> list[Row]:
    """Rows of one hub split; a ``ClassLabel`` column gives its label *names*, ``-1`` none."""
    ds = load_hub_dataset(name, config)
    if split not in ds:
        raise CmmergeError(
            f"hub data set {name!r} has no split {split!r} (splits: "
            f"{', '.join(ds)}; set task.hub_splits.<split>=NAME; {what})"
        )
    part = ds[split]
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column not in part.column_names:
            raise CmmergeError(
                f"hub data set {name!r} split {split!r}: no {role} column {column!r}; columns "
                f"found: {', '.join(part.column_names)} (set task.{role}_column; {what})"
            )
    feature = part.features[label_column]
    names = getattr(feature, "names", None)
    rows = []
    for i, (text, label) in enumerate(zip(part[text_column], part[label_column], strict=True)):
        if names is not None:
            label = names[label] if isinstance(label, int) and 0 <= label < len(names) else None
        rows.append(
            Row(str(text or "").strip(), None if label is None else str(label).strip(), i + 1)
        )
    return rows
