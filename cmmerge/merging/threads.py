"""How streamed tensor work is spread over threads: the CPUs to use, torch's own thread count
for a block, and the flat chunks a tensor is cut into (shared by the merge engine and the
task-vector extraction)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

CHUNK = 1 << 20  # elements per chunk (4 MiB in float32): fits the caches, amortises Python


def default_threads() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops with ``n`` threads inside (``n=1``: single-threaded), restoring the setting
    after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunk_ranges(n: int, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` flat ranges covering ``n`` elements, ``size`` (default CHUNK) each."""
    size = size or CHUNK
    return [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]
