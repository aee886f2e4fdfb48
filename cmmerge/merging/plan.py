"""Merge planning from headers only: which base tensors merge, which are copied, what every
output tensor looks like, and every bad input found before a byte is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader
from cmmerge.merging.keys import backbone_map, backbone_prefix

PathLike = str | os.PathLike


@dataclass
class Source:
    """One thing merged in: a task-vector file, or a model folder (delta = model - base)."""

    label: str
    reader: CheckpointReader
    names: dict[str, str]  # backbone name -> key in ``reader``
    is_model: bool


@dataclass
class Item:
    """One output tensor.

    Attributes:
        key: Its name (the base's key).
        shape: Output shape (more rows than the base when CPT grew the vocabulary).
        dtype: Output dtype.
        src_keys: Key in each source; empty for a tensor copied from the base.
        shared: Flat elements merged, or copied from the base for a head (the base's numel);
            the rest come from ``grown_from``.
        grown_from: Index of the source whose new rows are taken, or None.
        grown_key: The tensor's key in that source.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    src_keys: list[str] = field(default_factory=list)
    shared: int = 0
    grown_from: int | None = None
    grown_key: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_config(model_dir: PathLike) -> dict:
    """The config.json of a model folder ({} for a file or a folder without one)."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise CmmergeError(f"cannot read {path}: {exc}") from None


def open_sources(
    paths: list[PathLike], is_model: bool, base_dir: PathLike, allow_pickle: bool
) -> list[Source]:
    """Open the sources, aligning model keys to backbone names; the architecture (config
    ``model_type``, or a task vector's recorded one) must be the base's."""
    base_type = read_config(base_dir).get("model_type")
    sources = []
    for path in paths:
        reader = CheckpointReader(path, allow_pickle=allow_pickle)
        other = (
            read_config(path).get("model_type") if is_model else reader.metadata.get("model_type")
        )
        if base_type and other and other != base_type:
            reader.close()
            for s in sources:
                s.reader.close()
            raise CmmergeError(
                f"architectures differ: {base_dir} is {base_type!r} but {path} is {other!r}"
            )
        keys = reader.keys()
        names = (
            backbone_map(keys, backbone_prefix(path), str(path))
            if is_model
            else {k: k for k in keys}
        )
        sources.append(Source(str(path), reader, names, is_model))
    return sources


def _grown_rows(base_shape: tuple, other: tuple) -> bool:
    return (
        len(base_shape) == len(other) == 2
        and other[0] > base_shape[0]
        and other[1] == base_shape[1]
    )


def check_shape(
    name: str, base_shape: tuple, other: tuple, base: str, src: str, grow: bool = False
) -> bool:
    """True when ``other`` grows the rows of ``base_shape`` (allowed only with ``grow``); raise
    CmmergeError naming the tensor and both shapes when the shapes otherwise differ."""
    if tuple(base_shape) == tuple(other):
        return False
    if grow and _grown_rows(tuple(base_shape), tuple(other)):
        return True
    raise CmmergeError(
        f"shape mismatch for {name!r}: {tuple(base_shape)} in {base} vs {tuple(other)} in {src}"
    )


def plan_merge(
    base: CheckpointReader, base_dir: PathLike, sources: list[Source], dtype: torch.dtype | None
) -> tuple[list[Item], dict]:
    """Plan every output tensor of ``base + merge(sources)`` from the headers.

    Floating backbone tensors of the base merge and must exist in every source with the same
    shape (or more rows: a vocabulary grown by CPT, whose new rows come from the first source
    that has them); heads and non-float tensors are copied. With tied embeddings an
    ``lm_head.weight`` stored in the base is left out (transformers re-ties it on load).

    Returns:
        (items in base order, info with ``tau_keys_missing_in_base``, ``dropped_tied``,
        ``grown``).
    """
    prefix = backbone_prefix(base_dir)
    config = read_config(base_dir)
    tied = bool(config.get("tie_word_embeddings", False))
    items: list[Item] = []
    missing: list[tuple[str, str]] = []
    used: set[str] = set()
    dropped: list[str] = []
    grown: dict[str, int] = {}
    names = {key: name for name, key in backbone_map(base.keys(), prefix, str(base_dir)).items()}
    for key in base.keys():
        name = names.get(key)
        shape, base_dtype = base.shape(key), base.dtype(key)
        out_dtype = dtype if dtype is not None and base_dtype.is_floating_point else base_dtype
        if name is None and tied and key == "lm_head.weight":
            dropped.append(key)
            continue
        if name is None or not base_dtype.is_floating_point:
            items.append(Item(key, shape, out_dtype))
            continue
        absent = [s.label for s in sources if name not in s.names]
        if absent:
            missing += [(name, label) for label in absent]
            continue
        item = Item(key, shape, out_dtype, [s.names[name] for s in sources], math.prod(shape))
        for i, s in enumerate(sources):
            other = s.reader.shape(s.names[name])
            if not s.reader.dtype(s.names[name]).is_floating_point:
                raise CmmergeError(
                    f"{name!r} is {s.reader.dtype(s.names[name])} in {s.label} "
                    f"but floating point in {base_dir}"
                )
            if check_shape(name, shape, other, str(base_dir), s.label, grow=True):
                if item.grown_from is None:
                    item.grown_from, item.grown_key, item.shape = i, s.names[name], tuple(other)
                elif tuple(other) != item.shape:
                    raise CmmergeError(
                        f"sources grew {name!r} differently: {item.shape} in "
                        f"{sources[item.grown_from].label} vs {tuple(other)} "
                        f"in {s.label}"
                    )
        if item.grown_from is not None:
            grown[key] = item.shape[0]
        used.add(name)
        items.append(item)
    if grown:
        _grow_heads(items, grown, base, sources)
    if missing:
        name, label = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CmmergeError(f"tensor {name!r} of the base is missing in {label}{more}")
    if not any(item.src_keys for item in items):
        raise CmmergeError(f"no tensor of {base_dir} matches the sources to merge")
    unused = sorted({n for s in sources for n in s.names} - used)
    return items, {"tau_keys_missing_in_base": unused, "dropped_tied": dropped, "grown": grown}


def _grow_heads(
    items: list[Item], grown: dict[str, int], base: CheckpointReader, sources: list[Source]
) -> None:
    """Give untied vocabulary-sized heads (``lm_head.weight``, an MLM head's bias) the rows of a
    vocabulary that CPT grew: the base's rows, then the new ones from the model that grew it."""
    by_rows = {base.shape(it.key)[0]: it for it in items if it.key in grown}
    for item in items:
        if item.src_keys or not item.dtype.is_floating_point or not item.shape:
            continue
        embedding = by_rows.get(item.shape[0])
        if embedding is None:
            continue
        src = sources[embedding.grown_from]
        rows = embedding.shape[0]
        want = (rows, *item.shape[1:])
        if not src.is_model or item.key not in src.reader.keys():
            raise CmmergeError(
                f"{src.label} grew the vocabulary to {rows} rows but carries no {item.key!r} "
                f"(an untied head of {item.shape[0]} rows in the base): merge the model folder "
                "that grew it (models=[...]) so its new head rows can be taken"
            )
        if tuple(src.reader.shape(item.key)) != want:
            raise CmmergeError(
                f"shape mismatch for {item.key!r}: {tuple(src.reader.shape(item.key))} in "
                f"{src.label}, expected {want} for a vocabulary of {rows}"
            )
        item.shared, item.shape = item.numel, want
        item.grown_from, item.grown_key = embedding.grown_from, item.key
        grown[item.key] = rows
