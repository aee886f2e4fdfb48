"""Exact top-k magnitude selection over chunks, without sorting and without holding the data.

The magnitude of a float32 read as int32 with the sign bit cleared orders like the magnitude
itself (NaN above Inf above every finite value). Two routes find the k-th largest bit pattern:

* two passes: the first counts the top 16 bits (2**15 bins: exponent and 7 mantissa bits), which
  gives the bin holding the k-th largest; the second counts the entries of that bin one by one.
* sampled: a sample of whole blocks bounds the k-th largest, then one pass counts the entries
  above the bounds and those between them one by one. When the k-th largest falls outside
  the bounds (an unlucky sample: about one in 10**4) the two-pass route runs.

Counting is ``bincount`` over clamped keys: no sort, no gather. Ties at the threshold are broken
by position: the first ones in chunk order are kept, so exactly k entries survive. Passes take
the chunks as a list of tensors or recompute them, so one threshold can span a tensor
(``trim_scope=tensor``) or the whole model (``trim_scope=model``).
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

NBINS = 1 << 15
_SHIFT = 16
_LOW = 1 << _SHIFT  # values of the low bits within one bin
_MAX_BITS = 0x7FFFFFFF  # the largest magnitude bit pattern (a NaN)
MAX_WINDOW = 1 << 19  # at most this many bit patterns counted one by one after sampling
SAMPLE_BLOCK = 256  # entries sampled together (1 KiB: whole cache lines)
SAMPLE_SIZE = 1 << 19  # about this many entries sampled per domain, one block in 4 at most
MIN_SAMPLED = 1 << 21  # smaller domains go straight to the two-pass route (it is faster there)


def keep_count(density: float, numel: int) -> int:
    """mergekit's k: ``max(1, int(density * numel))`` (0 for an empty tensor)."""
    return max(1, int(density * numel)) if numel else 0


def magnitude_bits(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``|x|`` of a float32 array as int32 bit patterns (monotone in ``|x|``); a new array,
    or ``out``."""
    return np.bitwise_and(np.asarray(x, np.float32).view(np.int32), _MAX_BITS, out=out)


def histogram(x: np.ndarray) -> np.ndarray:
    """Counts of ``magnitude_bits(x) >> 16`` in ``NBINS`` bins (int64)."""
    flat = np.ascontiguousarray(x, np.float32).reshape(-1)
    if sys.byteorder == "little":
        # the top 16 bits of each float32 are its second uint16: counted with the sign bit
        # (2 * NBINS bins), the two signs folded after: one narrow pass, no shift
        both = np.bincount(flat.view(np.uint16)[1::2], minlength=2 * NBINS)
        return both[:NBINS] + both[NBINS:]
    return np.bincount(np.right_shift(magnitude_bits(flat), _SHIFT), minlength=NBINS)


_SCRATCH = threading.local()


def _scratch(n: int, name: str = "key", dtype: type = np.int32) -> np.ndarray:
    """This thread's reusable buffer ``name`` of ``n`` entries. The counting pass keeps small
    results per chunk; allocating its chunk-sized buffers afresh each time lets those results
    split the freed blocks, and the heap grows by about a chunk per call (600 MB over XLM-R's
    embedding)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, dtype=dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:n]


def window_counts(x: np.ndarray, lo: int, width: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Entries of ``x`` by magnitude bit pattern around ``[lo, lo + width)``: (how many lie
    above it, the offsets from ``lo`` present in it, their counts).

    A window usually holds a small share of the entries: they are picked out, sorted and
    counted alone, rather than binned with all the others (comparisons and ``count_nonzero``
    are far faster than ``bincount``). A window holding a large share (ties, a coarse window)
    is binned. The work happens in this thread's buffers; only the results are new memory."""
    flat = np.asarray(x, np.float32).reshape(-1)
    n = flat.size
    bits = magnitude_bits(flat, out=_scratch(n))
    mask = _scratch(n, "mask", np.bool_)
    top = lo + width
    above = int(np.count_nonzero(np.greater_equal(bits, top, out=mask))) if top <= _MAX_BITS else 0
    # bits - lo: the window becomes 0..width-1, below it negative (as unsigned: >= 2**31)
    shifted = np.subtract(bits, lo, out=bits)
    m = int(np.count_nonzero(np.less(shifted.view(np.uint32), width, out=mask)))
    if m * 16 > n:  # below -> 0, in the window -> 1..width, above -> width + 1
        np.clip(shifted, -1, width, out=shifted)
        counts = np.bincount(np.add(shifted, 1, out=shifted), minlength=width + 2)
        inside = counts[1 : width + 1]
        offsets = np.flatnonzero(inside)
        return above, offsets.astype(np.int32), inside[offsets].astype(np.int32)
    picked = shifted[mask]  # boolean indexing: several times faster than np.compress
    picked.sort()
    starts = np.flatnonzero(np.not_equal(picked[1:], picked[:-1], out=mask[: max(m - 1, 0)]))
    firsts = np.concatenate(([0], starts + 1)) if m else starts
    counts = np.diff(firsts, append=m)
    # copies: kept until the whole domain is counted (see _scratch)
    return above, picked[firsts], counts.astype(np.int32)


def _sample(x: np.ndarray, every: int) -> np.ndarray:
    """Magnitude bit patterns of one block of ``SAMPLE_BLOCK`` entries in ``every``."""
    flat = np.asarray(x, np.float32).reshape(-1)
    whole = flat.size // SAMPLE_BLOCK * SAMPLE_BLOCK
    return magnitude_bits(flat[:whole].reshape(-1, SAMPLE_BLOCK)[::every]).reshape(-1)


def _sample_bounds(sample: np.ndarray, upper_rank: int, lower_rank: int) -> tuple[int, int]:
    """The sample's ``upper_rank``-th and ``lower_rank``-th largest bit patterns (1-based ranks),
    found in the histogram bins holding them (no sort of the whole sample)."""
    hist = np.bincount(np.right_shift(sample, _SHIFT), minlength=NBINS)
    (top, above), (bottom, _) = _bin_of_kth(hist, upper_rank), _bin_of_kth(hist, lower_rank)
    lo, hi = bottom << _SHIFT, (top + 1) << _SHIFT
    inside = np.sort(sample[(sample >= lo) & (sample < hi)])[::-1]
    return int(inside[upper_rank - above - 1]), int(inside[lower_rank - above - 1])


@dataclass
class Threshold:
    """The k-th largest magnitude of a domain and how ties at it are kept.

    Attributes:
        bits: Magnitude bit pattern (int32 order) of the k-th largest entry.
        keep_equal: How many entries equal to it are kept (the first ones, in chunk order).
        equal_before: Per chunk, how many entries equal to it come in earlier chunks; empty
            when every equal entry is kept.
        equal_total: How many entries equal it in the whole domain.
    """

    bits: int
    keep_equal: int
    equal_before: list[int] = field(default_factory=list)
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


def _bin_of_kth(hist: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of entries in higher bins)."""
    from_top = np.cumsum(hist[::-1])
    idx = int(np.searchsorted(from_top, k))
    b = NBINS - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return b, above


def _resolve(
    lo: int, width: int, above: int, per_chunk: list[tuple[int, np.ndarray, np.ndarray]], k: int
) -> Threshold | None:
    """The threshold from per-chunk ``window_counts`` around ``lo``; None if the k-th largest
    lies outside the window."""
    dense = np.zeros(width, dtype=np.int64)
    for _, offsets, counts in per_chunk:
        dense[offsets] += counts  # a chunk's offsets are distinct
    rank = k - above  # 1-based rank from the top, within the window
    if rank <= 0 or rank > int(dense.sum()):
        return None
    from_top = np.cumsum(dense[::-1])
    j = int(np.searchsorted(from_top, rank))
    offset = width - 1 - j
    keep_equal = rank - (int(from_top[j - 1]) if j > 0 else 0)
    equal = [int(counts[offsets == offset].sum()) for _, offsets, counts in per_chunk]
    before = [0]
    for e in equal[:-1]:
        before.append(before[-1] + e)
    return Threshold(lo + offset, keep_equal, before if keep_equal < sum(equal) else [], sum(equal))


def _two_pass(
    chunks: Callable[[int], list[np.ndarray]], n_chunks: int, ks: list[int], map_fn: Callable
) -> list[Threshold | None]:
    """Pass 1: histogram of the top 16 bits, giving the bin of the k-th largest; pass 2: the
    entries of that bin counted one by one."""

    def hist_of(c: int) -> list[np.ndarray]:
        return [histogram(x) for x in chunks(c)]

    hists: list[np.ndarray] = []
    for chunk_hists in map_fn(hist_of, range(n_chunks)):  # summed as they come: bounded memory
        hists = [a + b for a, b in zip(hists, chunk_hists, strict=True)] if hists else chunk_hists
    found = [
        _bin_of_kth(h, k) if 0 < k < int(h.sum()) else None for h, k in zip(hists, ks, strict=True)
    ]

    def counts_of(c: int) -> list[tuple[int, np.ndarray, np.ndarray] | None]:
        return [
            window_counts(x, f[0] << _SHIFT, _LOW) if f else None
            for x, f in zip(chunks(c), found, strict=True)
        ]

    per_chunk = list(map_fn(counts_of, range(n_chunks)))
    return [
        _resolve(f[0] << _SHIFT, _LOW, f[1], [pc[i] for pc in per_chunk], k) if f else None
        for i, (f, k) in enumerate(zip(found, ks, strict=True))
    ]


def sample_blocks(n: int, every: int) -> int:
    """How many blocks ``_sample`` takes from a chunk of ``n`` entries, one in ``every``."""
    return -(-(n // SAMPLE_BLOCK) // every)


def _sampled(
    chunks: Callable[[int], list[np.ndarray]],
    n_chunks: int,
    ks: list[int],
    map_fn: Callable,
    total: int,
    sample: Callable[[int, int], list[np.ndarray]] | None = None,
) -> list[Threshold | None | bool]:
    """Pass 1: a sample of ~``SAMPLE_SIZE`` entries bounds the k-th largest (the sample's
    entries at its rank plus or minus four binomial standard deviations); pass 2 counts every
    entry between the bounds one by one, and those above. A source whose bounds are too far
    apart (more than ``MAX_WINDOW`` bit patterns) or miss the k-th largest gets False (to redo
    in two passes). ``sample(c, every)``, when given, gives chunk ``c``'s sample of every
    source as ``_sample`` takes it from the chunk (read without computing the whole chunk)."""
    every = max(4, -(-total // SAMPLE_SIZE))

    def sample_of(c: int) -> list[np.ndarray]:
        return sample(c, every) if sample else [_sample(x, every) for x in chunks(c)]

    per_chunk_samples = list(map_fn(sample_of, range(n_chunks)))
    windows: list[tuple[int, int] | None] = []
    for i, k in enumerate(ks):
        drawn = np.concatenate([cs[i] for cs in per_chunk_samples])
        n = drawn.size
        share = k / total
        rank = round(share * n)
        spread = int(4 * math.sqrt(n * share * (1 - share))) + 2
        if rank - spread < 1 or rank + spread > n:  # no sample bound on one side
            windows.append(None)
            continue
        high, low = _sample_bounds(drawn, rank - spread, rank + spread)
        width = high - low + 1
        windows.append((low, width) if width <= MAX_WINDOW else None)

    def counts_of(c: int) -> list[tuple[int, np.ndarray, np.ndarray] | None]:
        return [
            window_counts(x, *w) if w else None for x, w in zip(chunks(c), windows, strict=True)
        ]

    per_chunk = list(map_fn(counts_of, range(n_chunks))) if any(windows) else []
    out: list[Threshold | None | bool] = []
    for i, (w, k) in enumerate(zip(windows, ks, strict=True)):
        found = None
        if w is not None:
            counts = [pc[i] for pc in per_chunk]
            found = _resolve(w[0], w[1], sum(c[0] for c in counts), counts, k)
        out.append(found if found is not None else False)
    return out


def thresholds_over(
    chunks: Callable[[int], list[np.ndarray]],
    n_chunks: int,
    ks: list[int],
    map_fn: Callable[..., Iterable] = map,
    total: int | None = None,
    sample: Callable[[int, int], list[np.ndarray]] | None = None,
) -> list[Threshold | None]:
    """One ``Threshold`` per source over a domain of ``n_chunks`` chunks.

    Args:
        chunks: ``chunks(c)`` gives chunk ``c`` of every source (float32, one list entry per
            source); called two to four times per chunk.
        n_chunks: Number of chunks in the domain.
        ks: Entries to keep per source (``keep_count``); ``k >= total`` gives None (keep all).
        map_fn: ``map`` or an executor's ``map``: chunks are independent within a pass.
        total: Entries per source in the domain. Given (and at least ``MIN_SAMPLED``), a
            sample estimates the threshold first and one counting pass usually settles it:
            worth it when ``chunks`` returns data held in memory, or when ``sample`` reads
            the sample alone; the two-pass route serves the sources the sample misses.
        sample: ``sample(c, every)``: the magnitude bit patterns of chunk ``c``'s sample,
            one array per source, the blocks ``_sample`` takes; by default taken from
            ``chunks(c)``.
    """
    if total is None or total < MIN_SAMPLED:
        return _two_pass(chunks, n_chunks, ks, map_fn)
    todo = [i for i, k in enumerate(ks) if 0 < k < total]
    out: list[Threshold | None | bool] = [None] * len(ks)
    if todo:
        found = _sampled(
            lambda c: _pick(chunks(c), todo),
            n_chunks,
            [ks[i] for i in todo],
            map_fn,
            total,
            None if sample is None else lambda c, every: _pick(sample(c, every), todo),
        )
        for i, f in zip(todo, found, strict=True):
            out[i] = f
    missed = [i for i, f in enumerate(out) if f is False]
    if missed:
        redo = _two_pass(
            lambda c: _pick(chunks(c), missed), n_chunks, [ks[i] for i in missed], map_fn
        )
        for i, f in zip(missed, redo, strict=True):
            out[i] = f
    return out  # type: ignore[return-value]


def _pick(xs: list[np.ndarray], which: list[int]) -> list[np.ndarray]:
    return xs if len(which) == len(xs) else [xs[i] for i in which]


def threshold_of(parts: list[np.ndarray], k: int) -> Threshold | None:
    """``Threshold`` of the k largest magnitudes over float32 ``parts`` held in memory."""
    return thresholds_over(lambda c: [parts[c]], len(parts), [k])[0]


def trim_mask(x: np.ndarray, threshold: Threshold | None, chunk: int) -> np.ndarray:
    """Boolean mask of the entries of chunk number ``chunk`` (``x``, float32) that are kept."""
    if threshold is None:
        return np.ones(np.shape(x), dtype=np.bool_)
    bits = magnitude_bits(x)
    if not threshold.equal_before:
        return bits >= threshold.bits
    keep = bits > threshold.bits
    budget = threshold.keep_equal - threshold.equal_before[chunk]
    if budget > 0:
        flat_keep = keep.reshape(-1)
        flat_keep[np.flatnonzero(bits == threshold.bits)[:budget]] = True
    return keep


def trim_(x: np.ndarray, threshold: Threshold | None, chunk: int) -> np.ndarray:
    """Zero, in place, the entries of chunk number ``chunk`` (``x``, float32) that are not kept;
    returns ``x``."""
    if threshold is None:
        return x
    bound = threshold.bound(chunk)
    if bound is None:
        x[~trim_mask(x, threshold, chunk)] = 0
        return x
    # all ones where |x| >= bound, else zeros: (bound - 1 - bits) >> 31, no bool array
    keep = magnitude_bits(x, out=_scratch(x.size).reshape(x.shape))
    np.subtract(bound - 1, keep, out=keep)
    np.right_shift(keep, 31, out=keep)
    np.bitwise_and(x.view(np.int32), keep, out=x.view(np.int32))
    return x
