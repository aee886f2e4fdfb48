"""``cmmerge merge``: the command's config read once into the typed job of
:mod:`cmmerge.stages.merge` (every input resolved and checked), then run."""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.config.chain import require_upstream
from cmmerge.config.ids import cli_hint, stage_dirs
from cmmerge.config.inputs import resolve_model
from cmmerge.config.specs import CptSpec, MergeSpec, source_finetune_spec, source_names
from cmmerge.config.values import cache_dir, run_context
from cmmerge.errors import CmmergeError
from cmmerge.io import ownership
from cmmerge.merging.engine import check_output_dir
from cmmerge.merging.extract import TASK_VECTOR_FILE
from cmmerge.models.loading import local_model_dir
from cmmerge.stages.merge import MergeJob, work
from cmmerge.stages.runner import folder_input, run_stage, stage_input


def _sources(cfg: DictConfig, dirs: dict) -> tuple[list[Path], bool, list[dict]]:
    """(paths, paths_are_models, manifest inputs) of what is merged into the base."""
    if cfg.get("task_vectors") and cfg.get("models"):
        raise CmmergeError("give either models=[...] or task_vectors=[...], not both")
    if cfg.get("task_vectors"):
        paths = [Path(p).expanduser() for p in cfg.task_vectors]
        for p in paths:
            if not p.is_file():
                raise CmmergeError(f"task vector file {p} does not exist")
        return paths, False, [{"path": str(p), "size": p.stat().st_size} for p in paths]
    if cfg.get("models") is not None and len(cfg.models) == 0:
        raise CmmergeError("models=[] is empty: give at least one model folder to merge")
    if cfg.get("task_vectors") is not None and len(cfg.task_vectors) == 0:
        raise CmmergeError("task_vectors=[] is empty: give at least one task-vector file")
    if cfg.get("models"):
        paths = [
            local_model_dir(str(p), bool(cfg.get("allow_pickle")), deep=False) for p in cfg.models
        ]
        return paths, True, [folder_input(p) for p in paths]
    names = source_names(cfg)
    if names != ["cpt"]:  # multi-source: task vectors computed from the models on the fly
        found = [_run_source(cfg, dirs, name) for name in names]
        return [p for p, _ in found], True, [i for _, i in found]
    require_upstream(cfg, "merge")  # cpt and extract, both named when both are missing
    extract = dirs["extract"]
    return [extract / TASK_VECTOR_FILE], False, [stage_input(extract, cli_hint(cfg, "extract"))]


def _run_source(cfg: DictConfig, dirs: dict, name: str) -> tuple[Path, dict]:
    """A run-directory source: ``cpt``, or a task name = the model fine-tuned on that task from
    the base (its task vector, e.g. tau_en of an English task)."""
    if name == "cpt":
        cpt = CptSpec.from_config(cfg)
        return cpt.folder / "model", stage_input(cpt.folder, cpt.cli_hint())
    source = source_finetune_spec(cfg, name)
    return source.folder / "model", stage_input(source.folder, source.cli_hint())


def _weights(cfg: DictConfig, n: int) -> list[float]:
    weights = cfg.get("weights")
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise CmmergeError(f"weights has {len(weights)} values for {n} sources")
    return weights


def _output_dirs(cfg: DictConfig, dirs: dict) -> tuple[Path, Path]:
    """(stage folder holding the manifest, model folder); an ``output=`` folder is checked
    against the rule of what cmmerge may replace (:mod:`cmmerge.io.ownership`) first."""
    if not cfg.get("output"):
        return dirs["merge"], dirs["merge"] / "model"
    out = Path(str(cfg.output)).expanduser()
    ownership.claim(out, "merge", ownership.OUTPUT, bool(cfg.get("force")), "output")
    return out, out


def run(cfg: DictConfig) -> dict:
    """Merge the run's task vector (or ``models=``/``task_vectors=``) into the base."""
    # a standalone merge (output= and models= or task_vectors=) reads and writes no run folder
    standalone = cfg.get("output") and (cfg.get("models") or cfg.get("task_vectors"))
    dirs = {} if standalone else stage_dirs(cfg)
    spec = MergeSpec.from_config(cfg)
    _ = spec.shard_bytes  # a bad max_shard_size: one line, before any work
    pickle_ok = bool(cfg.get("allow_pickle"))
    # a merge reads tensors only: the outline check (no transformers import) is enough here
    base = (
        local_model_dir(str(cfg.base), pickle_ok, deep=False)
        if cfg.get("base")
        else resolve_model(cfg)
    )
    sources, are_models, source_inputs = _sources(cfg, dirs)
    weights = _weights(cfg, len(sources))
    check_output_dir(
        Path(str(cfg.output)) if cfg.get("output") else dirs["merge"],
        [("the base", base), *(("a source", s) for s in sources)],
    )
    stage_dir, final_model_dir = _output_dirs(cfg, dirs)
    spec = spec.resolve(source_paths=[str(s) for s in sources], source_weights=weights)
    job = MergeJob(
        spec,
        base,
        tuple(sources),
        are_models,
        in_subfolder=final_model_dir != stage_dir,
        hashes=cache_dir(cfg),
        allow_pickle=pickle_ok,
        grow_vocab=bool(cfg.get("grow_vocab")),
    )
    place = ownership.OUTPUT if cfg.get("output") else ownership.RUN
    inputs = [folder_input(base), *source_inputs]
    return run_stage(
        run_context(cfg),
        spec,
        inputs,
        functools.partial(work, job),
        folder=stage_dir,
        place=place,
    )
