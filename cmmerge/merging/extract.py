"""Streaming task-vector extraction ``tau = tuned - base`` and task-vector statistics."""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader, StreamingFileWriter
from cmmerge.io.dtypes import F32, DType, as_dtype, from_float32
from cmmerge.merging.keys import backbone_map, backbone_prefix, tied_copy, ties_embeddings
from cmmerge.merging.plan import ZERO_TENSORS, PathLike, check_shape, read_config
from cmmerge.merging.threads import chunk_ranges, default_threads

TASK_VECTOR_FILE = "task_vector.safetensors"

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group of a backbone tensor for per-layer totals: ``layer.<i>`` or its first module."""
    match = _LAYER.search(name)
    return f"layer.{int(match.group(1))}" if match else name.split(".", 1)[0]


def layer_totals(per_tensor: dict[str, dict]) -> dict[str, dict]:
    """Per-layer ``l2``, ``n_params`` and ``frac_changed`` from per-tensor stats (in order)."""
    out: dict[str, dict] = {}
    for name, st in per_tensor.items():
        agg = out.setdefault(layer_of(name), {"l2": 0.0, "n_params": 0, "changed": 0})
        agg["l2"] += st["l2"] ** 2
        agg["n_params"] += st["n_params"]
        agg["changed"] += st["frac_changed"] * st["n_params"]
    return {
        k: {
            "l2": v["l2"] ** 0.5,
            "n_params": v["n_params"],
            "frac_changed": v["changed"] / max(v["n_params"], 1),
        }
        for k, v in out.items()
    }


def extract_task_vector(
    base_dir: PathLike,
    tuned_dir: PathLike,
    out_file: PathLike,
    dtype: DType | str = "float32",
    allow_pickle: bool = False,
    threads: int | None = None,
) -> dict:
    """Write ``tau = tuned - base`` (float32 math) over the shared floating backbone tensors.

    Rows a CPT run added to the vocabulary are stored as the tuned values (base taken as 0),
    so merging takes the new rows from the source. Tensors the tuning left unchanged (all
    of tau zero: most of them after a LoRA CPT, the 168M-parameter embedding of Gemma-3-270M
    among them) are not stored; the file's metadata lists them (:data:`ZERO_TENSORS`) and the
    merge reads them as zeros.

    Args:
        base_dir: HF model folder of the base model.
        tuned_dir: HF model folder of the fine-tuned / CPT model.
        out_file: Output ``.safetensors`` path (a folder gets ``task_vector.safetensors``).
        dtype: Storage dtype of the task vector.
        allow_pickle: Accept pickle ``.bin`` checkpoints.
        threads: Worker threads (default: all CPUs).

    Returns:
        Stats: ``file``, ``n_tensors`` (stored), ``zero_tensors`` (not stored: all zero),
        ``n_params`` (of every tensor compared), ``l2_norm``, ``per_tensor`` (``l2``,
        ``n_params``, ``frac_changed``), ``per_layer``, ``grown``, ``skipped_head_keys``
        (``base_only``, ``tuned_only``, ``both``), ``skipped_non_float`` and ``base_only``
        (floating tensors of the base the tuned model lacks, e.g. a pooler: every merge copies
        them from the base unchanged).

    Raises:
        CmmergeError: Unreadable checkpoints, differing architectures, a shape mismatch, or no
            tensor in common.
    """
    dtype = as_dtype(dtype)
    out = Path(out_file)
    if out.is_dir():
        out = out / TASK_VECTOR_FILE
    base_type = _same_model_type(base_dir, tuned_dir)
    with (
        CheckpointReader(base_dir, allow_pickle) as base,
        CheckpointReader(tuned_dir, allow_pickle) as tuned,
    ):
        base_names = backbone_map(base.keys(), backbone_prefix(base_dir), str(base_dir))
        tuned_names = backbone_map(tuned.keys(), backbone_prefix(tuned_dir), str(tuned_dir))
        layout, non_float, grown = _layout(
            base, base_names, tuned, tuned_names, dtype, str(base_dir), str(tuned_dir)
        )
        used = [*layout, *non_float]
        skipped = _skipped_keys(
            base, {base_names[n] for n in used}, tuned, {tuned_names[n] for n in used}
        )
        base_only = _base_only(base, base_dir, tuned, tuned_dir)
        metadata = {
            "format": "pt",
            "kind": "task_vector",
            "base": str(base_dir),
            "tuned": str(tuned_dir),
            "model_type": str(base_type or ""),
        }
        zero = _unchanged(base, base_names, tuned, tuned_names, layout, grown, threads)
        if zero and len(zero) < len(layout):
            metadata[ZERO_TENSORS] = json.dumps(zero)
            stored = {n: v for n, v in layout.items() if n not in set(zero)}
        else:  # nothing changed at all: keep the zeros, a task vector is never empty
            zero, stored = [], layout
        sums: dict[str, list[float]] = {n: [0.0, 0.0] for n in layout}  # squares, nonzeros
        lock = threading.Lock()

        def work(name: str, start: int, stop: int) -> None:
            shared = math.prod(base.shape(base_names[name]))
            tau = tuned.read_float32(tuned_names[name], start, stop)
            if start < shared:
                tau[: shared - start] -= base.read_float32(
                    base_names[name], start, min(stop, shared)
                )
            wide = tau.astype(np.float64)
            sq, nz = float(wide @ wide), int(np.count_nonzero(tau))
            if dtype != F32:
                out = np.empty(tau.size, dtype.storage)
                tau = from_float32(tau, dtype, out, np.empty(tau.size, np.uint32))
            writer.write(name, tau, start, dtype)
            with lock:
                sums[name][0] += sq
                sums[name][1] += nz

        with (
            StreamingFileWriter(out, stored, metadata) as writer,
            ThreadPoolExecutor(threads or default_threads()) as pool,
        ):
            futures = [
                pool.submit(work, name, s, e)
                for name, (_, shape) in stored.items()
                for s, e in chunk_ranges(math.prod(shape))
            ]
            for future in futures:
                future.result()
    per_tensor = {
        n: {
            "l2": sums[n][0] ** 0.5,
            "n_params": math.prod(s),
            "frac_changed": sums[n][1] / max(math.prod(s), 1),
        }
        for n, (_, s) in layout.items()
    }
    return {
        "file": str(out),
        "n_tensors": len(stored),
        "zero_tensors": zero,
        "n_params": sum(p["n_params"] for p in per_tensor.values()),
        "l2_norm": sum(p["l2"] ** 2 for p in per_tensor.values()) ** 0.5,
        "per_tensor": per_tensor,
        "per_layer": layer_totals(per_tensor),
        "grown": grown,
        "skipped_head_keys": skipped,
        "base_only": base_only,
        "skipped_non_float": non_float,
    }


def _same_model_type(base_dir: PathLike, tuned_dir: PathLike) -> str | None:
    """The base's config ``model_type``; refuse a tuned model of another architecture."""
    base_type, tuned_type = (read_config(d).get("model_type") for d in (base_dir, tuned_dir))
    if base_type and tuned_type and base_type != tuned_type:
        raise CmmergeError(
            f"architectures differ: {base_dir} is {base_type!r} but {tuned_dir} is {tuned_type!r}"
        )
    return base_type


def _layout(
    base: CheckpointReader,
    base_names: dict[str, str],
    tuned: CheckpointReader,
    tuned_names: dict[str, str],
    dtype: DType,
    base_dir: str,
    tuned_dir: str,
) -> tuple[dict[str, tuple[DType, tuple[int, ...]]], list[str], dict[str, int]]:
    """The shared floating tensors' (dtype, shape), the shared non-float ones and grown rows."""
    layout: dict[str, tuple[DType, tuple[int, ...]]] = {}
    non_float: list[str] = []
    grown: dict[str, int] = {}
    for name, bkey in base_names.items():
        if name not in tuned_names:
            continue
        tkey = tuned_names[name]
        if not (base.dtype(bkey).is_floating_point and tuned.dtype(tkey).is_floating_point):
            non_float.append(name)
            continue
        shape = tuned.shape(tkey)
        if check_shape(name, base.shape(bkey), shape, base_dir, tuned_dir, True):
            grown[name] = shape[0]
        layout[name] = (dtype, shape)
    if not layout:
        raise CmmergeError(f"no backbone tensors in common between {base_dir} and {tuned_dir}")
    return layout, non_float, grown


def _skipped_keys(
    base: CheckpointReader, used_base: set[str], tuned: CheckpointReader, used_tuned: set[str]
) -> dict[str, list[str]]:
    """The keys left out of the backbone (heads): in the base only, the tuned only, or both."""
    left_base = [k for k in base.keys() if k not in used_base]
    left_tuned = [k for k in tuned.keys() if k not in used_tuned]
    return {
        "base_only": [k for k in left_base if k not in tuned],
        "tuned_only": [k for k in left_tuned if k not in base],
        "both": [k for k in left_base if k in tuned],
    }


def _unchanged(
    base: CheckpointReader,
    base_names: dict[str, str],
    tuned: CheckpointReader,
    tuned_names: dict[str, str],
    layout: dict[str, tuple[DType, tuple[int, ...]]],
    grown: dict[str, int],
    threads: int | None,
) -> list[str]:
    """The tensors of ``layout`` whose tau is zero everywhere (equal in float32), in order. A
    tensor that changed usually differs in its first chunk, so this costs little beyond reading
    the unchanged ones."""

    def same(name: str) -> bool:
        bkey, tkey = base_names[name], tuned_names[name]
        for start, stop in chunk_ranges(math.prod(layout[name][1])):
            a = tuned.read_float32(tkey, start, stop)
            if not np.array_equal(a, base.read_float32(bkey, start, stop)):
                return False
        return True

    names = [n for n in layout if n not in grown]
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        flags = list(pool.map(same, names))
    return [n for n, flag in zip(names, flags, strict=True) if flag]


def _base_only(
    base: CheckpointReader, base_dir: PathLike, tuned: CheckpointReader, tuned_dir: PathLike
) -> list[str]:
    """Floating tensors of the base that the tuned model does not have at all (a pooler or NSP
    head its class does not save): merges carry them over from the base unchanged."""
    tied = ties_embeddings(read_config(base_dir))
    keys = set(base.keys())
    names = backbone_map(base.keys(), backbone_prefix(base_dir), str(base_dir), heads=True)
    have = backbone_map(tuned.keys(), backbone_prefix(tuned_dir), str(tuned_dir), heads=True)
    return [
        key
        for name, key in names.items()
        if name not in have
        and base.dtype(key).is_floating_point
        and not (tied and tied_copy(key, name, keys))
    ]


def task_vector_cosines(files: list[PathLike]) -> list[list[float]]:
    """Pairwise cosine similarities of task-vector files (streamed). A tensor one file holds and
    another does not (left out as all zero, or never there) counts as zero in the other, so the
    norms cover each whole vector; a tensor stored with different shapes (a grown vocabulary)
    is left out of every pair."""
    readers = [CheckpointReader(f) for f in files]
    try:
        n = len(readers)
        dots = np.zeros((n, n), dtype=np.float64)
        keys = list(dict.fromkeys(k for r in readers for k in r.keys()))
        for key in keys:
            holders = [i for i, r in enumerate(readers) if key in r]
            if len({tuple(readers[i].shape(key)) for i in holders}) > 1:
                continue
            first = readers[holders[0]]
            index = np.array(holders)
            for s, e in chunk_ranges(first.numel(key)):
                x = np.stack([readers[i].read_float32(key, s, e) for i in holders])
                x = x.astype(np.float64)
                dots[index[:, None], index[None, :]] += x @ x.T
    finally:
        for r in readers:
            r.close()
    norms = np.maximum(np.sqrt(dots.diagonal()), 1e-30)
    return (dots / norms[:, None] / norms[None, :]).tolist()
