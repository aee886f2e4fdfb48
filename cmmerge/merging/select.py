"""Exact top-k magnitude selection over chunks, without sorting and without holding the data.

The magnitude of a float32 read as int32 with the sign bit cleared orders like the magnitude
itself (NaN above Inf above every finite value). Pass 1 counts the top 16 bits of those bit
patterns (2**15 bins: exponent and 7 mantissa bits); the bin holding the k-th largest is then
known, and pass 2 counts the low 16 bits of the entries in that bin (2**16 bins), which gives
the exact k-th largest bit pattern. Ties at the threshold are broken by position: the first ones
in chunk order are kept, so exactly k entries survive. Passes take the chunks as a list of
tensors or recompute them, so one threshold can span a tensor (``trim_scope=tensor``) or the
whole model (``trim_scope=model``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

NBINS = 1 << 15
_SHIFT = 16
_LOW = 1 << _SHIFT  # values of the low bits within one bin
NONFINITE_BIN = 0x7F800000 >> _SHIFT  # bins at or above this hold Inf and NaN


def keep_count(density: float, numel: int) -> int:
    """mergekit's k: ``max(1, int(density * numel))`` (0 for an empty tensor)."""
    return max(1, int(density * numel)) if numel else 0


def magnitude_bits(x: Tensor) -> Tensor:
    """``|x|`` of a float32 tensor as int32 bit patterns (monotone in ``|x|``); a new tensor."""
    return x.view(torch.int32).bitwise_and(0x7FFFFFFF)


def histogram(x: Tensor) -> Tensor:
    """Counts of ``magnitude_bits(x) >> 16`` in ``NBINS`` bins (int64)."""
    return torch.bincount(
        magnitude_bits(x).bitwise_right_shift_(_SHIFT).reshape(-1), minlength=NBINS
    )


def low_histogram(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """The low 16 bits of the magnitude bit patterns of ``x`` that fall in bin ``b``, counted:
    (values present, their counts), both 1-D int64, values ascending."""
    key = magnitude_bits(x).reshape(-1)
    # in the bin -> 1..2**16; below -> 0; above -> 2**16 + 1 (one pass each, no gather)
    key.sub_((b << _SHIFT) - 1).clamp_(0, _LOW + 1)
    counts = torch.bincount(key, minlength=_LOW + 2)[1 : _LOW + 1]
    values = counts.nonzero().view(-1)
    return values, counts[values]


@dataclass
class Threshold:
    """The k-th largest magnitude of a domain and how ties at it are kept.

    Attributes:
        bits: Magnitude bit pattern (int32 order) of the k-th largest entry.
        keep_equal: How many entries equal to it are kept (the first ones, in chunk order).
        equal_before: Per chunk, how many entries equal to it come in earlier chunks; empty
            when every equal entry is kept.
        nonfinite: Whether the domain holds NaN or Inf.
    """

    bits: int
    keep_equal: int
    equal_before: list[int] = field(default_factory=list)
    nonfinite: bool = False
    equal_total: int = 0

    def bound(self, chunk: int) -> int | None:
        """The magnitude bit pattern from which chunk ``chunk`` keeps every entry (all at or
        above it, none below), or None when the chunk keeps only some of the entries equal
        to the threshold."""
        if not self.equal_before:
            return self.bits
        budget = self.keep_equal - self.equal_before[chunk]
        after = self.equal_before[chunk + 1 : chunk + 2] or [self.equal_total]
        if budget <= 0:
            return self.bits + 1  # none of its equal entries
        if budget >= after[0] - self.equal_before[chunk]:
            return self.bits  # all of them
        return None


def _bin_of_kth(hist: Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of entries in higher bins)."""
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    b = NBINS - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return b, above


def thresholds_over(
    chunks: Callable[[int], list[Tensor]],
    n_chunks: int,
    ks: list[int],
    map_fn: Callable[..., Iterable] = map,
) -> list[Threshold | None]:
    """One ``Threshold`` per source over a domain of ``n_chunks`` chunks.

    Args:
        chunks: ``chunks(c)`` gives chunk ``c`` of every source (float32, one list entry per
            source); called twice per chunk.
        n_chunks: Number of chunks in the domain.
        ks: Entries to keep per source (``keep_count``); ``k >= total`` gives None (keep all).
        map_fn: ``map`` or an executor's ``map``: chunks are independent within a pass.
    """

    def hist_of(c: int) -> list[Tensor]:
        return [histogram(x) for x in chunks(c)]

    hists: list[Tensor] = []
    for chunk_hists in map_fn(hist_of, range(n_chunks)):  # summed as they come: bounded memory
        hists = [a + b for a, b in zip(hists, chunk_hists, strict=True)] if hists else chunk_hists
    found = [
        _bin_of_kth(h, k) if 0 < k < int(h.sum()) else None for h, k in zip(hists, ks, strict=True)
    ]

    def lows_of(c: int) -> list[tuple[Tensor, Tensor] | None]:
        return [
            low_histogram(x, f[0]) if f else None for x, f in zip(chunks(c), found, strict=True)
        ]

    per_chunk = list(map_fn(lows_of, range(n_chunks)))
    out: list[Threshold | None] = []
    for i, (f, k) in enumerate(zip(found, ks, strict=True)):
        if f is None:
            out.append(None)
            continue
        b, above = f
        lows = torch.zeros(_LOW, dtype=torch.int64)
        for pc in per_chunk:
            lows.index_add_(0, pc[i][0], pc[i][1])
        rank = k - above  # 1-based rank from the top, within the bin
        from_top = lows.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
        low = _LOW - 1 - j
        keep_equal = rank - (int(from_top[j - 1]) if j > 0 else 0)
        equal = [int(cnt[val == low].sum()) for val, cnt in (pc[i] for pc in per_chunk)]
        before = [0]
        for e in equal[:-1]:
            before.append(before[-1] + e)
        out.append(
            Threshold(
                (b << _SHIFT) + low,
                keep_equal,
                before if keep_equal < sum(equal) else [],
                bool(hists[i][NONFINITE_BIN:].sum() > 0),
                sum(equal),
            )
        )
    return out


def threshold_of(parts: list[Tensor], k: int) -> Threshold | None:
    """``Threshold`` of the k largest magnitudes over float32 ``parts`` held in memory."""
    return thresholds_over(lambda c: [parts[c]], len(parts), [k])[0]


def trim_mask(x: Tensor, threshold: Threshold | None, chunk: int) -> Tensor:
    """Boolean mask of the entries of chunk number ``chunk`` (``x``, float32) that are kept."""
    if threshold is None:
        return torch.ones_like(x, dtype=torch.bool)
    bits = magnitude_bits(x)
    if not threshold.equal_before:
        return bits >= threshold.bits
    keep = bits > threshold.bits
    budget = threshold.keep_equal - threshold.equal_before[chunk]
    if budget > 0:
        flat_keep, equal = keep.view(-1), (bits == threshold.bits).view(-1).nonzero().view(-1)
        flat_keep[equal[:budget]] = True
    return keep


def trim_(x: Tensor, threshold: Threshold | None, chunk: int) -> Tensor:
    """Zero, in place, the entries of chunk number ``chunk`` (``x``, float32) that are not kept;
    returns ``x``."""
    if threshold is None:
        return x
    bound = threshold.bound(chunk)
    if bound is None:
        return x.mul_(trim_mask(x, threshold, chunk))
    # all ones where |x| >= bound, else zeros: (bound - 1 - bits) >> 31, no bool tensor
    keep = magnitude_bits(x).neg_().add_(bound - 1).bitwise_right_shift_(31)
    x.view(torch.int32).bitwise_and_(keep)
    return x
