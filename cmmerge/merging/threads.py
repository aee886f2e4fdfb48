"""How streamed tensor work is spread over threads: the CPUs to use, torch's own thread count
for a block, and the flat chunks a tensor is cut into (shared by the merge engine and the
task-vector extraction)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cmmerge.dist import usable_cpus

CHUNK = 1 << 20  # elements per chunk (4 MiB in float32): fits the caches, amortises Python


def default_threads() -> int:
    """The CPUs this process may use (:func:`cmmerge.dist.usable_cpus`)."""
    return usable_cpus()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops with ``n`` threads inside (``n=1``: single-threaded), restoring the setting
    after (imports torch: for torch code, not the numpy merge)."""
    import torch

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
