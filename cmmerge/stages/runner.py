"""Run one stage: skip it when finished with the same config and inputs, else do it and write
its manifest last, atomically."""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cmmerge import __version__
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import (
    MANIFEST,
    fingerprint,
    folder_fingerprint,
    git_revision,
    manifest_hash,
    read_manifest,
    write_json_atomic,
)
from cmmerge.settings import plain, run_dir
from cmmerge.stages import dist

log = logging.getLogger("cmmerge")


def stage_input(stage_dir: Path, hint: str) -> dict:
    """An upstream stage this one reads; it must be finished (``hint`` says how to make it)."""
    digest = manifest_hash(stage_dir)
    if digest is None:
        raise CmmergeError(
            f"{stage_dir} is not a finished stage (no {MANIFEST}): run `{hint}` first"
        )
    return {"path": str(stage_dir), "manifest_sha256": digest}


def folder_input(folder: Path) -> dict:
    """An external folder this stage reads (a base model, a user's checkpoint)."""
    finished = read_manifest(folder)
    if finished is not None:
        return {"path": str(folder), "manifest_sha256": manifest_hash(folder)}
    return {"path": str(folder), "fingerprint": folder_fingerprint(folder)}


def _versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (importing peft or datasets costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"cmmerge": __version__, "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "datasets", "safetensors", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests, pipeline called directly)
        return []


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_stage(
    cfg: DictConfig,
    stage: str,
    stage_dir: Path,
    config_view: dict[str, Any],
    inputs: list[dict],
    work: Callable[[Path], dict[str, Any]],
    all_ranks: bool = False,
) -> dict:
    """Do ``work(stage_dir)`` unless an identical finished stage is there; return the manifest.

    Args:
        cfg: the composed config (for ``force``, ``seed`` and the record).
        stage: stage name for the manifest.
        stage_dir: the stage's folder in the run directory.
        config_view: the part of the config that determines this stage's result.
        inputs: upstream stages and folders (from :func:`stage_input` / :func:`folder_input`).
        work: does the stage; returns a dict with ``metrics`` and ``outputs`` (and anything else
            worth recording).
        all_ranks: under a multi-process launch, every process runs ``work`` (training,
            prediction); otherwise rank 0 alone does and the others wait. Rank 0 alone writes
            the manifest either way.
    """
    stage_dir = Path(stage_dir)
    digest = fingerprint(config_view, inputs)
    previous = read_manifest(stage_dir)
    if previous is not None and previous.get("fingerprint") == digest and not cfg.get("force"):
        log.info("%s: up to date in %s, skipped (force=true redoes it)", stage, stage_dir)
        previous["skipped"] = True
        return previous
    if previous is not None:
        reason = "force=true" if cfg.get("force") else "config or inputs changed"
        log.info("%s: redoing %s (%s)", stage, stage_dir, reason)
    dist.barrier()  # every rank has read the old manifest before rank 0 removes it
    if dist.is_main():
        (stage_dir / MANIFEST).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if dist.is_main() or all_ranks:
        manifest = _do(cfg, stage, stage_dir, config_view, inputs, work, digest)
    dist.barrier()
    if not dist.is_main():
        manifest = read_manifest(stage_dir) or {}
    manifest["skipped"] = False
    return manifest


def _do(cfg, stage, stage_dir, config_view, inputs, work, digest) -> dict:
    handler = logging.FileHandler(stage_dir / f"{stage}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("cmmerge", "transformers"):
        logging.getLogger(name).addHandler(handler)
    log.info("%s: running -> %s", stage, stage_dir)
    _reset_gpu_peak()
    start = time.time()
    try:
        result = work(stage_dir)
    finally:
        for name in ("cmmerge", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    manifest = {
        "stage": stage,
        "status": "finished",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir(cfg)),
        "fingerprint": digest,
        "config": config_view,
        "overrides": _overrides(),
        "inputs": inputs,
        "outputs": result.pop("outputs", []),
        "metrics": result.pop("metrics", {}),
        "seed": config_view.get("seed", cfg.get("seed")),
        "versions": _versions(),
        "git_revision": git_revision(),
        "wall_time_s": round(time.time() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **_gpu_peak(),
        "world_size": dist.world_size(),
        **result,
    }
    if dist.is_main():
        write_json_atomic(stage_dir / MANIFEST, manifest)
    return manifest


def _reset_gpu_peak() -> None:
    """Start this stage's GPU peak from zero (a pipeline runs every stage in one process)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> dict[str, float]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def view(cfg: DictConfig, *keys: str, **extra: Any) -> dict[str, Any]:
    """Plain copy of selected top-level config keys (``model``, ``cpt``, ...) plus extras."""
    out = {k: plain(cfg.get(k)) for k in keys}
    out.update(extra)
    return out
