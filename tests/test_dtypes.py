"""The numpy dtype conversions of the merge engine round exactly as torch does (bit for bit;
a NaN stays a NaN, its payload aside, which torch's own CPU paths do not agree on)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmmerge.io.dtypes import DTYPES, as_dtype, from_float32, from_torch, to_float32, to_torch


def _same(got: np.ndarray, want: np.ndarray, dtype) -> bool:
    """Equal bit for bit where ``want`` is a number; NaN where it is NaN."""
    nan = np.isnan(to_float32(want, dtype, np.empty(want.size, np.float32)))
    got_nan = np.isnan(to_float32(got, dtype, np.empty(got.size, np.float32)))
    bits = f"u{want.itemsize}"
    same_bits = np.array_equal(got.view(bits)[~nan], want.view(bits)[~nan])
    return bool(np.array_equal(nan, got_nan)) and same_bits


def _edge_values() -> np.ndarray:
    """Random values over many magnitudes, exact ties at the bfloat16 rounding point (even and
    odd), the float32 extremes, signed zeros, infinities and NaNs with payloads."""
    g = np.random.default_rng(0)
    x = g.standard_normal(200_000).astype(np.float32) * np.logspace(
        -30, 30, 200_000, dtype=np.float32
    )
    bits = g.integers(0, 1 << 32, size=20_000, dtype=np.uint64).astype(np.uint32)
    ties = (bits & 0xFFFF0000) | 0x8000  # exactly half-way between two bfloat16 values
    special = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38, 1e-45, 65504.0,
         65520.0, 1e5, -1e5],
        dtype=np.float32,
    )  # fmt: skip
    payload_nans = np.array([0x7FFFFFFF, 0xFFC00001, 0x7F800001, 0x7FBFFFFF], np.uint32)
    return np.concatenate(
        [x, ties.view(np.float32), bits.view(np.float32), special, payload_nans.view(np.float32)]
    )


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float64"])
def test_from_float32_rounds_bit_for_bit_as_torch(name):
    x = _edge_values()
    dtype = as_dtype(name)
    out = np.empty(x.size, dtype.storage)
    got = from_float32(x, dtype, out, np.empty(x.size, np.uint32))
    want = from_torch(torch.from_numpy(x).to(getattr(torch, name)))[0]
    assert _same(got, want, dtype)
    assert np.isnan(x).sum() >= 6 and np.isinf(x).sum() >= 2


def test_from_float32_may_skip_the_nan_search_only_for_finite_values():
    x = _edge_values()
    x = x[np.isfinite(x)]
    bf16 = DTYPES["BF16"]
    quick = from_float32(x, bf16, np.empty(x.size, np.uint16), np.empty(x.size, np.uint32), True)
    want = from_torch(torch.from_numpy(x).to(torch.bfloat16))[0]
    assert np.array_equal(quick, want)


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float64", "float8_e4m3fn"])
def test_to_float32_and_torch_views_agree_with_torch(name):
    values = torch.from_numpy(_edge_values()).to(getattr(torch, name))
    stored, dtype = from_torch(values)
    assert dtype.name == name and stored.dtype == dtype.storage
    got = to_float32(stored, dtype, np.empty(stored.size, np.float32))
    want = values.to(torch.float32).numpy()
    assert _same(got, want, DTYPES["F32"])
    assert torch.equal(to_torch(stored, dtype).view(torch.uint8), values.view(torch.uint8))


def test_dtypes_compare_with_torch_dtypes_and_names():
    bf16 = as_dtype(torch.bfloat16)
    assert bf16 is DTYPES["BF16"] and bf16 == torch.bfloat16 and bf16 == "bfloat16"
    assert bf16 != torch.float16 and str(bf16) == "bfloat16" and bf16.itemsize == 2
    assert as_dtype("F32") == as_dtype("float32") and not as_dtype("int64").is_floating_point
    with pytest.raises(ValueError, match="unknown dtype"):
        as_dtype("float128")
