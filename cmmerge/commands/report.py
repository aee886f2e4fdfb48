"""``cmmerge report``: the command's config read once into the typed job of
:mod:`cmmerge.stages.report` (every input resolved and checked), then run."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.config.specs import ReportSpec
from cmmerge.config.values import run_context
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import manifest_hash
from cmmerge.stages.report import _PATTERNS, work
from cmmerge.stages.runner import run_stage


def run(cfg: DictConfig) -> dict:
    """The table of arms and metrics over the finished stages of the configured runs."""
    spec = ReportSpec.from_config(cfg)
    finished = sorted(
        p
        for root in spec.runs
        for pat in _PATTERNS
        for p in Path(root).glob(pat)
        if transaction.finished_manifest(p)
    )
    inputs = [{"path": str(p), "manifest_sha256": manifest_hash(p)} for p in finished]
    if not inputs:
        where = ", ".join(spec.runs)
        raise CmmergeError(f"nothing to report in {where}: no finished finetune or prompt stage")
    manifest = run_stage(run_context(cfg), spec, inputs, functools.partial(work, spec))
    print((spec.folder / "report.md").read_text(encoding="utf-8"))
    return manifest
