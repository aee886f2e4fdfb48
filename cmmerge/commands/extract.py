"""``cmmerge extract``: the command's config read once into the typed job of
:mod:`cmmerge.stages.extract` (every input resolved and checked), then run."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.config.chain import require_upstream
from cmmerge.config.inputs import resolve_model
from cmmerge.config.specs import ExtractSpec
from cmmerge.config.values import run_context
from cmmerge.errors import CmmergeError
from cmmerge.stages.extract import ExtractJob, work
from cmmerge.stages.runner import folder_input, run_stage, stage_input


def run(cfg: DictConfig) -> dict:
    """The task vector tau = theta_cpt - theta_base of the configured CPT."""
    spec = ExtractSpec.from_config(cfg)
    cpt_dir = spec.cpt.folder
    base = resolve_model(cfg)
    others = [Path(p).expanduser() for p in (cfg.get("task_vectors") or [])]
    for p in others:
        if not p.is_file():
            raise CmmergeError(f"task vector file {p} does not exist")
    require_upstream(cfg, "extract")
    inputs = [
        folder_input(base),
        stage_input(cpt_dir, spec.cpt.cli_hint()),
        *({"path": str(p), "size": p.stat().st_size} for p in others),
    ]
    job = ExtractJob(spec, base, tuple(others), bool(cfg.get("allow_pickle")))
    return run_stage(run_context(cfg), spec, inputs, functools.partial(work, job))
