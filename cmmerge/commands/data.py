"""``cmmerge data``: the command's config read once into the typed job of
:mod:`cmmerge.stages.data` (every input resolved and checked), then run."""

from __future__ import annotations

import functools
import json

from omegaconf import DictConfig

from cmmerge.config.inputs import data_inputs, guarded_corpus, model_source
from cmmerge.config.specs import DataSpec
from cmmerge.config.values import cache_dir, data_root, run_context
from cmmerge.stages.data import DataJob, summary, work
from cmmerge.stages.runner import run_stage


def data_job(cfg: DictConfig) -> DataJob:
    """The job the composed config describes (a missing ``data.root``: a one-line error)."""
    data_root(cfg)
    return DataJob(
        spec=DataSpec.from_config(cfg),
        corpus=guarded_corpus(cfg),
        model=model_source(cfg) if cfg.data.get("token_lengths", True) else None,
        cache=cache_dir(cfg),
    )


def run(cfg: DictConfig) -> dict:
    """Load the corpus and the task splits; write their counts, labels and the leakage removed."""
    job = data_job(cfg)  # a missing data.root is named before anything is locked
    spec = job.spec
    inputs = data_inputs(cfg, [str(cfg.task.name)], corpus=True, guard=True)
    manifest = run_stage(run_context(cfg), spec, inputs, functools.partial(work, job))
    stats = json.loads((spec.folder / "stats.json").read_text(encoding="utf-8"))
    print(summary(stats), flush=True)
    return manifest
