"""`cmmerge merge`: theta = theta_base + lambda * combine(tau_1..tau_n), streamed tensor by tensor.

In a run directory the sources default to the run's task vector and the output to
``merge/<method>-l<lambda>[-d<density>]/model``; ``base=``, ``models=``/``task_vectors=``,
``weights=`` and ``output=DIR`` merge any Hugging Face folders (DIR is then the model folder).

A standalone merge of models merges the whole model, heads included (as mergekit); the in-run
merge of the task vector (backbone only) keeps the base's heads, e.g. the MLM head that
fine-tuning drops. Tensors only the base has (a pooler, an NSP head) are carried over unchanged
and listed in merge.yaml and the model card. Weights are written in float32 unless ``dtype=``
asks otherwise, and config.json says so. Every output goes into the folder ``work`` is given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from cmmerge.errors import CmmergeError
from cmmerge.io import ownership
from cmmerge.io.hashes import describe
from cmmerge.io.model_card import write_model_card
from cmmerge.io.model_files import (
    WRITE_DTYPES,
    copy_model_files,
    record_dtype,
    record_grown_vocab,
)
from cmmerge.merging.engine import check_output_dir, merge_into_base, merge_models
from cmmerge.merging.extract import TASK_VECTOR_FILE
from cmmerge.merging.mergekit_config import mergekit_yaml
from cmmerge.merging.methods import get_method
from cmmerge.models.loading import local_model_dir
from cmmerge.settings import cache_dir
from cmmerge.stages.chain import require_upstream
from cmmerge.stages.ids import cli_hint, stage_dirs
from cmmerge.stages.inputs import resolve_model
from cmmerge.stages.runner import RunContext, folder_input, run_stage, stage_input
from cmmerge.stages.spec import CptSpec, MergeSpec, source_finetune_spec, source_names


def method_params(cfg: DictConfig) -> dict:
    """The validated parameters of the configured method (density only where it applies)."""
    return dict(MergeSpec.from_config(cfg).params)


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


@dataclass(frozen=True)
class MergeJob:
    """A merge with everything resolved from the command: all that :func:`work` reads.

    Attributes:
        spec: The merge's spec (method, lambda, parameters, dtype, shard size; its sources and
            weights resolved).
        base: The base model folder.
        sources: The models (``are_models``) or task-vector files merged into it.
        are_models: Whether ``sources`` are models (their task vectors taken on the fly).
        in_subfolder: The model goes into ``model/`` of the stage folder (a run directory),
            else into the folder itself (``output=``).
        hashes: cmmerge's cache folder, where the weights' SHA-256 digests are remembered.
        allow_pickle: Pickle weights may be read.
        grow_vocab: A source with a larger vocabulary may grow the merged one.
    """

    spec: MergeSpec
    base: Path
    sources: tuple[Path, ...]
    are_models: bool
    in_subfolder: bool
    hashes: Path
    allow_pickle: bool = False
    grow_vocab: bool = False


def work(job: MergeJob, work_dir: Path) -> dict:
    """Merge into ``work_dir`` and describe the result (``merge.yaml``, ``mergekit.yaml``, the
    model card); returns what the manifest records."""

    spec, base, sources = job.spec, job.base, list(job.sources)
    method, scale, params = spec.method, spec.scale, dict(spec.params)
    weights = list(spec.source_weights)

    model_dir = work_dir / "model" if job.in_subfolder else work_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    merge = merge_models if job.are_models else merge_into_base
    dtype = spec.dtype or None
    stats = merge(
        base,
        sources,
        weights,
        method,
        scale,
        model_dir,
        dtype=dtype,
        max_shard_size=spec.shard_bytes,
        allow_nonfinite=spec.allow_nonfinite,
        allow_pickle=job.allow_pickle,
        grow_vocab=job.grow_vocab,
        **params,
    )
    copy_model_files(base, model_dir)
    record_dtype(model_dir, stats["dtype"])
    if stats["grown"]:
        record_grown_vocab(model_dir, sources if job.are_models else [], stats["grown"])
    described = [describe(s, job.hashes) for s in sources]  # remembered there
    record = {
        "method": method,
        "lambda": scale,
        **params,
        "weights": weights,
        "dtype": stats["dtype"],
        "base": str(base),
        "base_sha256": describe(base, job.hashes)["sha256"],
        "sources": described,
        "base_only": stats["base_only"],
        "heads_copied": stats["heads_copied"],
        "not_in_every_source": stats["not_in_every_source"],
        "dropped_tied": stats["dropped_tied"],
    }
    (model_dir / "merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
    mk = (
        mergekit_yaml(method, scale, params, weights, base, sources, spec.dtype or "float32")
        if job.are_models
        else None
    )
    if mk is not None:
        (model_dir / "mergekit.yaml").write_text(mk)
    write_model_card(
        model_dir,
        f"{spec.folder_id} merge",
        f"`{base}` merged with {len(sources)} source(s) by cmmerge ({method}: "
        f"{get_method(method).description}).",
        {
            **{k: v for k, v in record.items() if k not in _LISTS},
            "sources": ", ".join(f"{d['path']} (sha256 {d['sha256']})" for d in described),
            "mergekit config": "mergekit.yaml" if mk else "none (no equivalent)",
            "carried over from the base unchanged": _listed(
                stats["base_only"] + stats["not_in_every_source"]
            ),
            "heads copied from the base (the task vector holds the backbone)": _listed(
                stats["heads_copied"]
            ),
            "left out (tied, re-tied on load)": _listed(stats["dropped_tied"]),
        },
    )
    return {
        "metrics": {k: stats[k] for k in ("n_merged", "n_copied") if k in stats},
        "outputs": ["model/" if job.in_subfolder else "."],
        "merge": stats,
        **({"vocab_grown": stats["grown"]} if stats["grown"] else {}),
    }


def run(cfg: DictConfig) -> dict:
    # a standalone merge (output= and models= or task_vectors=) reads and writes no run folder
    standalone = cfg.get("output") and (cfg.get("models") or cfg.get("task_vectors"))
    dirs = {} if standalone else stage_dirs(cfg)
    spec = MergeSpec.from_config(cfg)
    if cfg.get("dtype") and str(cfg.dtype) not in WRITE_DTYPES:
        raise CmmergeError(f"dtype={cfg.dtype}: choose one of {', '.join(WRITE_DTYPES)}")
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
        RunContext.of(cfg),
        spec,
        inputs,
        functools.partial(work, job),
        folder=stage_dir,
        place=place,
    )


_LISTS = ("sources", "base_only", "heads_copied", "not_in_every_source", "dropped_tied")


def _listed(keys: list[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys) if keys else "none"
