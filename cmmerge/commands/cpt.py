"""``cmmerge cpt``: the command's config read once into the typed job of
:mod:`cmmerge.stages.cpt` (every input resolved and checked), then run."""

from __future__ import annotations

import functools

from omegaconf import DictConfig

from cmmerge.config.inputs import corpus_input, cpt_corpus, data_inputs, resolve_model
from cmmerge.config.specs import CptSpec
from cmmerge.config.values import cache_dir, data_root, run_context
from cmmerge.models.loading import model_kind
from cmmerge.stages.cpt import CptJob, work
from cmmerge.stages.runner import folder_input, run_stage


def run(cfg: DictConfig) -> dict:
    """Continued pre-training of the configured model on the configured corpus (leakage-guarded)."""
    spec = CptSpec.from_config(cfg)
    base = resolve_model(cfg)
    kind = model_kind(base, str(cfg.model.kind))
    data_root(cfg)  # a missing data.root is named before anything is locked
    texts, corpus_stats = cpt_corpus(cfg)
    job = CptJob(
        spec,
        base,
        kind,
        model_name=str(cfg.model.name),
        texts=texts,
        corpus_stats=corpus_stats,
        cache=cache_dir(cfg),
    )
    inputs = [folder_input(base), *data_inputs(cfg, [], corpus=True), corpus_input(cfg, texts)]
    return run_stage(run_context(cfg), spec, inputs, functools.partial(work, job))
