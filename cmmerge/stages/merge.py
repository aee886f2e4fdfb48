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

from dataclasses import dataclass
from pathlib import Path

import yaml

from cmmerge.config.specs import MergeSpec
from cmmerge.io.hashes import describe
from cmmerge.io.model_card import write_model_card
from cmmerge.io.model_files import (
    copy_model_files,
    record_dtype,
    record_grown_vocab,
)
from cmmerge.merging.engine import merge_into_base, merge_models
from cmmerge.merging.mergekit_config import mergekit_yaml
from cmmerge.merging.methods import get_method


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


_LISTS = ("sources", "base_only", "heads_copied", "not_in_every_source", "dropped_tied")


def _listed(keys: list[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys) if keys else "none"
