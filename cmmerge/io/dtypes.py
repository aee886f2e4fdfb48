"""Tensor dtypes as safetensors stores them, and float conversions in numpy (no torch).

A :class:`DType` names a safetensors dtype (``F32``, ``BF16``...) and the numpy dtype that
holds its bits (``bfloat16`` in ``uint16``, float8 in ``uint8``). The merge reads, computes
and writes numpy arrays of those storage dtypes, so a merge process never imports torch
(about a second of its start-up). Conversions to and from float32 round as torch does:
bfloat16 to nearest-even with every NaN written as ``0x7FC0``, float16 by numpy's IEEE cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class DType:
    """One stored dtype.

    Attributes:
        code: The safetensors name (``F32``, ``BF16``, ...).
        name: The torch name without ``torch.`` (``float32``, ``bfloat16``, ...).
        storage: The numpy dtype holding its bits.
        is_floating_point: Whether it holds floating-point numbers.
    """

    code: str
    name: str
    storage: np.dtype
    is_floating_point: bool

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        """Equal to the same DType, and to the torch dtype or name it stands for."""
        if isinstance(other, DType):
            return other.code == self.code
        return str(other).removeprefix("torch.") in (self.name, self.code)

    def __hash__(self) -> int:
        return hash(self.code)


def _d(code: str, name: str, storage: Any, floating: bool) -> DType:
    return DType(code, name, np.dtype(storage), floating)


DTYPES: dict[str, DType] = {
    d.code: d
    for d in (
        _d("F64", "float64", np.float64, True),
        _d("F32", "float32", np.float32, True),
        _d("F16", "float16", np.float16, True),
        _d("BF16", "bfloat16", np.uint16, True),
        _d("F8_E4M3", "float8_e4m3fn", np.uint8, True),
        _d("F8_E5M2", "float8_e5m2", np.uint8, True),
        _d("I64", "int64", np.int64, False),
        _d("I32", "int32", np.int32, False),
        _d("I16", "int16", np.int16, False),
        _d("I8", "int8", np.int8, False),
        _d("U8", "uint8", np.uint8, False),
        _d("BOOL", "bool", np.bool_, False),
    )
}
_BY_NAME = {d.name: d for d in DTYPES.values()}
F32 = DTYPES["F32"]


def as_dtype(dtype: DType | str | Any) -> DType:
    """The :class:`DType` of a safetensors code, a torch name (``bfloat16``) or a torch dtype."""
    if isinstance(dtype, DType):
        return dtype
    name = str(dtype).removeprefix("torch.")
    found = DTYPES.get(name) or _BY_NAME.get(name)
    if found is None:
        raise ValueError(f"unknown dtype {dtype!r}")
    return found


def _torch_convert(x: np.ndarray, src: DType, dst: DType, out: np.ndarray) -> np.ndarray:
    """Float8 conversions, which numpy lacks: done by torch (imported only then)."""
    to_torch(out, dst).copy_(to_torch(x, src))
    return out


def to_float32(x: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
    """Stored values ``x`` of ``dtype`` as float32, written into ``out`` (returned)."""
    if dtype.code == "BF16":  # the 16 bits are the high half of a float32
        np.left_shift(x, 16, out=out.view(np.uint32), dtype=np.uint32)
        return out
    if dtype.storage.kind == "f":
        np.copyto(out, x, casting="unsafe")
        return out
    return _torch_convert(x, dtype, F32, out)


def from_float32(
    x: np.ndarray, dtype: DType, out: np.ndarray, scratch: np.ndarray, finite: bool = False
) -> np.ndarray:
    """Float32 ``x`` stored as ``dtype`` into ``out`` (its storage dtype, returned), rounded as
    torch rounds; ``scratch`` is a uint32 buffer of ``x``'s length for bfloat16. ``finite``:
    the caller has checked that ``x`` holds no NaN (which bfloat16 then need not look for)."""
    if dtype.code == "BF16":
        bits = x.view(np.uint32)
        # round to nearest even: add 0x7FFF plus the lowest kept bit, keep the high half
        np.right_shift(bits, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        np.add(scratch, 0x7FFF, out=scratch)
        np.add(scratch, bits, out=scratch)
        np.right_shift(scratch, 16, out=out, casting="unsafe")
        with np.errstate(over="ignore", invalid="ignore"):
            if not finite and not math.isfinite(float(x.sum())):
                out[np.isnan(x)] = 0x7FC0  # a NaN stays a NaN (rounding could make it Inf)
        return out
    if dtype.storage.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):  # Inf where float16 overflows
            np.copyto(out, x, casting="unsafe")
        return out
    return _torch_convert(x, F32, dtype, out)


def to_torch(x: np.ndarray, dtype: DType) -> Any:
    """A torch tensor over the same memory as stored values ``x`` of ``dtype`` (imports torch)."""
    import torch

    return torch.from_numpy(x).view(getattr(torch, dtype.name))


def from_torch(tensor: Any) -> tuple[np.ndarray, DType]:
    """(A flat numpy array over a CPU tensor's values in its storage dtype, its DType)."""
    dtype = as_dtype(tensor.dtype)
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if dtype.code == "BF16" or dtype.code.startswith("F8"):  # numpy has no such dtype
        import torch

        flat = flat.view(getattr(torch, dtype.storage.name))
    return flat.numpy(), dtype
