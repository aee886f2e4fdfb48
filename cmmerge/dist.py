"""Multi-process runs (``accelerate launch``): rank 0 alone writes files, the others wait."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may use (its affinity set, where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on the process that writes manifests, metrics and reports (rank 0, or no launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def init() -> None:
    """Join the process group of a multi-process launch (no-op for one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState()


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if world_size() > 1:
        import torch.distributed as torch_dist

        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.barrier()
