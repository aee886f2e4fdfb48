"""Merge planning from headers only: which base tensors merge, which are copied, what every
output tensor looks like, and every bad input found before a byte is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader
from cmmerge.io.dtypes import F32, DType
from cmmerge.merging.keys import (
    backbone_map,
    backbone_prefix,
    canonical,
    is_head_key,
    layer_template,
    tied_copy,
    ties_embeddings,
)

PathLike = str | os.PathLike
# metadata key of a task-vector file: the JSON list of the tensors left out because they are all
# zero (a LoRA CPT leaves most tensors untouched); a merge reads them as zeros
ZERO_TENSORS = "zero_tensors"


@dataclass
class Source:
    """One thing merged in: a task-vector file, or a model folder (delta = model - base)."""

    label: str
    reader: CheckpointReader
    names: dict[str, str]  # name (backbone name, or a head's own key) -> key in ``reader``
    is_model: bool
    templates: set[str] = field(default_factory=set)  # layer templates of ``names`` and zeros
    zeros: set[str] = field(default_factory=set)  # names a task vector left out as all zero

    def __post_init__(self) -> None:
        self.templates = {
            t for t in map(layer_template, [*self.names, *self.zeros]) if t is not None
        }

    def has(self, name: str) -> bool:
        """Whether the source holds ``name``, stored or as a left-out zero tensor."""
        return name in self.names or name in self.zeros


@dataclass
class Item:
    """One output tensor.

    Attributes:
        key: Its name (the base's key).
        shape: Output shape (more rows than the base when CPT grew the vocabulary).
        dtype: Output dtype.
        src_keys: Key in each source (None: all zero in that task vector, not stored); empty
            for a tensor copied from the base.
        shared: Flat elements merged, or copied from the base for a head (the base's numel);
            the rest come from ``grown_from``.
        grown_from: Index of the source whose new rows are taken, or None.
        grown_key: The tensor's key in that source.
    """

    key: str
    shape: tuple[int, ...]
    dtype: DType
    src_keys: list[str | None] = field(default_factory=list)
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
            backbone_map(keys, backbone_prefix(path), str(path), heads=True)
            if is_model
            else {canonical(k): k for k in keys}
        )
        zeros = set() if is_model else set(json.loads(reader.metadata.get(ZERO_TENSORS) or "[]"))
        sources.append(Source(str(path), reader, names, is_model, zeros=zeros - set(names)))
    return sources


def _grown_rows(base_shape: tuple, other: tuple, vectors: bool = False) -> bool:
    """``other`` has more rows than ``base_shape`` and the same row shape (2-D; also 1-D with
    ``vectors``)."""
    return (
        len(base_shape) == len(other)
        and (len(other) == 2 or (vectors and len(other) == 1))
        and other[0] > base_shape[0]
        and other[1:] == base_shape[1:]
    )


def check_shape(
    name: str,
    base_shape: tuple,
    other: tuple,
    base: str,
    src: str,
    grow: bool = False,
    vectors: bool = False,
) -> bool:
    """True when ``other`` grows the rows of ``base_shape`` (allowed only with ``grow``; 1-D
    tensors only with ``vectors`` too); raise CmmergeError naming the tensor and both shapes
    when the shapes otherwise differ."""
    if tuple(base_shape) == tuple(other):
        return False
    if grow and _grown_rows(tuple(base_shape), tuple(other), vectors):
        return True
    raise _mismatch(name, base_shape, other, base, src)


def _mismatch(name: str, base_shape: tuple, other: tuple, base: str, src: str) -> CmmergeError:
    return CmmergeError(
        f"shape mismatch for {name!r}: {tuple(base_shape)} in {base} vs {tuple(other)} in {src}"
    )


def _merged_item(
    key: str,
    name: str,
    shape: tuple,
    dtype: DType,
    sources: list[Source],
    base_dir: str,
    vectors: list[tuple[Item, str, tuple, str]],
) -> Item:
    """The item merging base tensor ``key`` (backbone ``name``) with every source that stores it
    (one that left it out, all zero, merges as zeros of the base's shape). The first source with
    more rows grows it, and every other that grew it must agree; a grown 1-D tensor is added to
    ``vectors`` for :func:`_check_grown_vectors`."""
    item = Item(key, shape, dtype, [s.names.get(name) for s in sources], math.prod(shape))
    for i, s in enumerate(sources):
        if name not in s.names:
            continue
        other = tuple(s.reader.shape(s.names[name]))
        if not s.reader.dtype(s.names[name]).is_floating_point:
            raise CmmergeError(
                f"{name!r} is {s.reader.dtype(s.names[name])} in {s.label} "
                f"but floating point in {base_dir}"
            )
        if not check_shape(name, shape, other, base_dir, s.label, grow=True, vectors=True):
            continue
        if item.grown_from is None:
            item.grown_from, item.grown_key, item.shape = i, s.names[name], other
            if len(other) == 1:
                vectors.append((item, name, shape, s.label))
        elif other != item.shape:
            raise CmmergeError(
                f"sources grew {name!r} differently: {item.shape} in "
                f"{sources[item.grown_from].label} vs {other} in {s.label}"
            )
    return item


def plan_merge(
    base: CheckpointReader, base_dir: PathLike, sources: list[Source], dtype: DType | None
) -> tuple[list[Item], dict]:
    """Plan every output tensor of ``base + merge(sources)`` from the headers.

    A floating tensor of the base merges when every source has it (by backbone name; a head by
    its own key), with the same shape or more rows (a vocabulary grown by CPT, whose new rows
    come from the first source that has them). One that no source has, or only some do, is
    copied from the base and listed (a pooler or NSP head the CPT model does not save: in
    ``base_only``; the heads task vectors leave out: in ``heads_copied``). A source that lacks
    a tensor of a numbered layer while it has the same tensor in other layers is refused
    (another depth, or a damaged checkpoint). A tensor a task vector left out as all zero
    (:data:`ZERO_TENSORS`) merges as zeros; one that is zero in every source is copied from the
    base (``zero_in_every_source``): the merge of zeros is the base.
    Non-float tensors are copied. With tied embeddings, an output-embedding copy stored in the
    base (``lm_head.weight``, ``lm_head.decoder.weight``...) is left out: transformers re-ties
    it on load. Floating tensors are written in ``dtype``, float32 by default.

    Returns:
        (items in base order, info with ``base_only``, ``heads_copied``, ``not_in_every_source``,
        ``zero_in_every_source``, ``tau_keys_missing_in_base``, ``dropped_tied``, ``grown`` and
        ``dtype``).
    """
    prefix = backbone_prefix(base_dir)
    tied = ties_embeddings(read_config(base_dir))
    out_float = dtype or F32
    items: list[Item] = []
    missing: list[tuple[str, str]] = []
    used: set[str] = set()
    dropped: list[str] = []
    copied: dict[str, list[str]] = {"base_only": [], "heads_copied": [], "not_in_every_source": []}
    unchanged: list[str] = []
    grown: dict[str, int] = {}
    vectors: list[tuple[Item, str, tuple, str]] = []  # grown 1-D tensors, checked below
    aligned = backbone_map(base.keys(), prefix, str(base_dir), heads=True)
    names = {key: name for name, key in aligned.items()}
    keyset = set(names)
    for key in base.keys():
        name = names[key]
        shape, base_dtype = base.shape(key), base.dtype(key)
        if not base_dtype.is_floating_point:
            items.append(Item(key, shape, base_dtype))
            continue
        if tied and tied_copy(key, name, keyset):
            dropped.append(key)  # transformers re-ties it on load
            continue
        absent = [s for s in sources if not s.has(name)]
        if not absent and not any(name in s.names for s in sources):
            unchanged.append(key)  # zero in every source: the base's tensor is the result
            items.append(Item(key, shape, out_float))
            used.add(name)
            continue
        if absent:
            template = layer_template(name)
            missing += [(name, s.label) for s in absent if template in s.templates]
            copied[_copied_as(key, absent, sources)].append(key)
            items.append(Item(key, shape, out_float))
            continue
        item = _merged_item(key, name, shape, out_float, sources, str(base_dir), vectors)
        if item.grown_from is not None:
            grown[key] = item.shape[0]
        used.add(name)
        items.append(item)
    _check_missing(missing)
    _check_grown_vectors(vectors, items, str(base_dir))
    if grown:
        _grow_heads(items, grown, base, sources)
    if not any(item.src_keys for item in items):
        raise CmmergeError(f"no tensor of {base_dir} matches the sources to merge")
    unused = sorted({n for s in sources for n in [*s.names, *s.zeros]} - used)
    return items, {
        **copied,
        "zero_in_every_source": unchanged,
        "tau_keys_missing_in_base": unused,
        "dropped_tied": dropped,
        "grown": grown,
        "dtype": str(out_float),
    }


def _copied_as(key: str, absent: list[Source], sources: list[Source]) -> str:
    """The info list of a base tensor copied because the ``absent`` sources lack it."""
    if len(absent) < len(sources):
        return "not_in_every_source"
    if is_head_key(key) and not any(s.is_model for s in sources):
        return "heads_copied"  # task vectors hold the backbone only
    return "base_only"


def _check_missing(missing: list[tuple[str, str]]) -> None:
    """Refuse the sources lacking a numbered layer's tensor they have in other layers."""
    if missing:
        name, label = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CmmergeError(f"tensor {name!r} of the base is missing in {label}{more}")


def _check_grown_vectors(
    vectors: list[tuple[Item, str, tuple, str]], items: list[Item], base_dir: str
) -> None:
    """A 1-D tensor may grow only with a grown vocabulary (an MLM head's bias): from the rows of
    a grown 2-D tensor to its new rows; any other change of length is a shape mismatch."""
    rows = {
        (it.shared // it.shape[1], it.shape[0])
        for it in items
        if it.grown_from is not None and len(it.shape) == 2
    }
    for item, name, base_shape, label in vectors:
        if (base_shape[0], item.shape[0]) not in rows:
            raise _mismatch(name, base_shape, item.shape, base_dir, label)


def _grow_heads(
    items: list[Item], grown: dict[str, int], base: CheckpointReader, sources: list[Source]
) -> None:
    """Give untied vocabulary-sized tensors copied from the base (``lm_head.weight``, an MLM
    head's bias, when not every source has them) the rows of a vocabulary that CPT grew: the
    base's rows, then the new ones from the model that grew it."""
    by_rows = {base.shape(it.key)[0]: it for it in items if it.key in grown and len(it.shape) == 2}
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
