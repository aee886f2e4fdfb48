"""Streaming task-vector extraction and merging over safetensors checkpoints.

Tensors are read, combined and written one at a time (``CheckpointReader`` / ``ShardedWriter``),
so memory stays near one shard plus one tensor per source. Only weights are written: the caller
copies config.json, the tokenizer and writes the model card.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointReader,
    ShardedWriter,
    StreamingFileWriter,
)
from cmmerge.merging.keys import backbone_key, backbone_map, backbone_prefix
from cmmerge.merging.methods import get_method, resolve_params

TASK_VECTOR_FILE = "task_vector.safetensors"
PathLike = str | os.PathLike


def _check_shape(name: str, base_shape: tuple, other_shape: tuple, base: str, other: str) -> None:
    """Raise CmmergeError unless the two shapes are equal (vocabulary growth named as such)."""
    if tuple(base_shape) == tuple(other_shape):
        return
    if (
        len(base_shape) == len(other_shape) == 2
        and other_shape[0] > base_shape[0]
        and tuple(other_shape[1:]) == tuple(base_shape[1:])
    ):
        raise CmmergeError(
            f"{name!r} has {other_shape[0]} rows in {other} but {base_shape[0]} in {base}: "
            "a vocabulary grown during CPT is not supported yet"
        )
    shapes = f"{tuple(base_shape)} in {base} vs {tuple(other_shape)} in {other}"
    raise CmmergeError(f"shape mismatch for {name!r}: {shapes}")


def extract_task_vector(
    base_dir: PathLike, tuned_dir: PathLike, out_file: PathLike, dtype: torch.dtype = torch.float32
) -> dict:
    """Write ``tau = tuned - base`` (float32 math) over the shared floating backbone tensors.

    Args:
        base_dir: HF model folder of the base model.
        tuned_dir: HF model folder of the fine-tuned / CPT model.
        out_file: Output ``.safetensors`` path (a folder gets ``task_vector.safetensors``).
        dtype: Storage dtype of the task vector.

    Returns:
        Stats: ``file``, ``n_tensors``, ``n_params``, ``l2_norm``, ``per_tensor`` (``l2``,
        ``frac_changed``), ``skipped_head_keys`` (``base_only``, ``tuned_only`` and ``both``:
        keys left out because they are heads or have no counterpart) and ``skipped_non_float``.

    Raises:
        CmmergeError: Unreadable checkpoints, a shape mismatch, or no tensor in common.
    """
    out = Path(out_file)
    if out.is_dir():
        out = out / TASK_VECTOR_FILE
    with CheckpointReader(base_dir) as base, CheckpointReader(tuned_dir) as tuned:
        base_names = backbone_map(base.keys(), backbone_prefix(base_dir), str(base_dir))
        tuned_names = backbone_map(tuned.keys(), backbone_prefix(tuned_dir), str(tuned_dir))
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        non_float: list[str] = []
        for name, bkey in base_names.items():
            if name not in tuned_names:
                continue
            tkey = tuned_names[name]
            if not (base.dtype(bkey).is_floating_point and tuned.dtype(tkey).is_floating_point):
                non_float.append(name)
                continue
            _check_shape(name, base.shape(bkey), tuned.shape(tkey), str(base_dir), str(tuned_dir))
            layout[name] = (dtype, base.shape(bkey))
        if not layout:
            raise CmmergeError(f"no backbone tensors in common between {base_dir} and {tuned_dir}")

        used_base = {base_names[n] for n in [*layout, *non_float]}
        used_tuned = {tuned_names[n] for n in [*layout, *non_float]}
        left_base = [k for k in base.keys() if k not in used_base]
        left_tuned = [k for k in tuned.keys() if k not in used_tuned]
        skipped = {
            "base_only": [k for k in left_base if k not in tuned],
            "tuned_only": [k for k in left_tuned if k not in base],
            "both": [k for k in left_base if k in tuned],
        }

        per_tensor: dict[str, dict[str, float]] = {}
        sq_sum, n_params = 0.0, 0
        metadata = {
            "format": "pt",
            "kind": "task_vector",
            "base": str(base_dir),
            "tuned": str(tuned_dir),
        }
        with StreamingFileWriter(out, layout, metadata) as writer:
            for name in layout:
                tau = tuned.get(tuned_names[name]).to(torch.float32) - base.get(
                    base_names[name]
                ).to(torch.float32)
                l2 = float(torch.linalg.vector_norm(tau, dtype=torch.float64))
                changed = int(torch.count_nonzero(tau))
                per_tensor[name] = {"l2": l2, "frac_changed": changed / max(tau.numel(), 1)}
                sq_sum += l2 * l2
                n_params += tau.numel()
                writer.write(name, tau.to(dtype))
    return {
        "file": str(out),
        "n_tensors": len(layout),
        "n_params": n_params,
        "l2_norm": sq_sum**0.5,
        "per_tensor": per_tensor,
        "skipped_head_keys": skipped,
        "skipped_non_float": non_float,
    }


@dataclass
class _Source:
    """One thing to merge in: a task vector file, or a model folder (delta = model - base)."""

    label: str
    reader: CheckpointReader
    names: dict[str, str]  # backbone name -> key in ``reader``
    is_model: bool


def _merge(
    base_dir: PathLike,
    source_paths: list[PathLike],
    is_model: bool,
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    density: float | None,
    sign: str | None,
    normalize: bool | None,
    dtype: torch.dtype | None,
    max_shard_size: int,
) -> dict:
    fn = get_method(method).fn
    kwargs = resolve_params(method, density=density, sign=sign, normalize=normalize)
    if not source_paths:
        raise CmmergeError("nothing to merge: no task vectors or models given")
    if len(weights) != len(source_paths):
        raise CmmergeError(f"{len(source_paths)} sources to merge but {len(weights)} weights")
    if Path(out_dir).resolve() == Path(base_dir).resolve():
        raise CmmergeError(f"output folder {out_dir} is the base model's folder")
    weights = [float(w) for w in weights]

    with ExitStack() as stack:
        base = stack.enter_context(CheckpointReader(base_dir))
        prefix = backbone_prefix(base_dir)
        sources = []
        for path in source_paths:
            reader = stack.enter_context(CheckpointReader(path))
            keys = reader.keys()
            names = (
                backbone_map(keys, backbone_prefix(path), str(path))
                if is_model
                else {k: k for k in keys}
            )
            sources.append(_Source(str(path), reader, names, is_model))

        # Plan every tensor (headers only) before writing anything.
        plan: dict[str, str | None] = {}
        missing: list[str] = []
        for key in base.keys():
            name = backbone_key(key, prefix)
            plan[key] = None
            if name is None or not base.dtype(key).is_floating_point:
                continue
            if not all(name in s.names for s in sources):
                missing.append(name)
                continue
            if not all(s.reader.dtype(s.names[name]).is_floating_point for s in sources):
                continue
            for s in sources:
                _check_shape(
                    name, base.shape(key), s.reader.shape(s.names[name]), str(base_dir), s.label
                )
            plan[key] = name
        merged_names = {n for n in plan.values() if n is not None}
        if not merged_names:
            raise CmmergeError(f"no tensor of {base_dir} matches the sources to merge")
        unused = sorted({n for s in sources for n in s.names} - merged_names - set(missing))

        writer = stack.enter_context(ShardedWriter(out_dir, max_shard_size=max_shard_size))
        n_merged = n_copied = 0
        for key, name in plan.items():
            tensor = base.get(key)
            out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            if name is None:
                writer.add(key, tensor.to(out_dtype))
                n_copied += 1
                continue
            base_f32 = tensor.to(torch.float32)
            deltas = []
            for s in sources:
                delta = s.reader.get(s.names[name]).to(torch.float32)
                deltas.append(delta - base_f32 if s.is_model else delta)
            merged = base_f32 + scale * fn(deltas, weights, **kwargs)
            writer.add(key, merged.to(out_dtype))
            n_merged += 1
            del deltas, merged, base_f32, tensor
        files = writer.close()
    return {
        "n_merged": n_merged,
        "n_copied": n_copied,
        "merged_keys_missing_in_tau": missing,
        "tau_keys_missing_in_base": unused,
        "files": [str(f) for f in files],
    }


def merge_into_base(
    base_dir: PathLike,
    task_vector_files: list[PathLike],
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    density: float | None = None,
    sign: str | None = "sum",
    normalize: bool | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Write ``base + scale * combine(method, [tau_1..tau_n], weights)`` to ``out_dir``.

    Base tensors whose backbone name every task vector has are merged (float32 math, cast back
    to the base dtype or ``dtype``); heads, non-float tensors and tensors some task vector lacks
    are copied. A tied ``lm_head`` absent from the base stays absent, so the tie is kept.

    Args:
        base_dir: HF model folder of the base.
        task_vector_files: Files written by ``extract_task_vector`` (keyed by backbone names).
        weights: One weight per task vector.
        method: Registry name (``task_arithmetic``/``tv``, ``ties``).
        scale: The ``lambda`` multiplying the combined delta.
        out_dir: Folder for the weights (``model.safetensors`` or shards + index).
        density: TIES trim density in (0, 1] (None: method default).
        sign: TIES sign election, ``sum`` or ``count``.
        normalize: None for the method's default.
        dtype: Output dtype of floating tensors (None keeps the base's).
        max_shard_size: Shard size in bytes.

    Returns:
        Stats: ``n_merged``, ``n_copied``, ``merged_keys_missing_in_tau`` (float backbone tensors
        of the base that some task vector lacks), ``tau_keys_missing_in_base``, ``files``.

    Raises:
        CmmergeError: Bad method/params, unreadable checkpoints, or shapes that do not line up.
    """
    return _merge(
        base_dir, list(task_vector_files), False, list(weights), method, scale, out_dir,
        density, sign, normalize, dtype, max_shard_size,
    )  # fmt: skip


def merge_models(
    base_dir: PathLike,
    model_dirs: list[PathLike],
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    density: float | None = None,
    sign: str | None = "sum",
    normalize: bool | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Like ``merge_into_base`` with ``tau_i = model_i - base`` computed per tensor on the fly.

    ``model_dirs`` are HF model folders (any head); their keys are aligned to the base through
    backbone names, so e.g. a classifier merges into an MLM base. Stats as ``merge_into_base``.
    """
    return _merge(
        base_dir, list(model_dirs), True, list(weights), method, scale, out_dir,
        density, sign, normalize, dtype, max_shard_size,
    )  # fmt: skip
