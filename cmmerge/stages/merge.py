"""`cmmerge merge`: theta = theta_base + lambda * combine(tau_1..tau_n), streamed tensor by tensor.

In a run directory the sources default to the run's task vector and the output to
``merge/<method>-l<lambda>[-d<density>]/model``; ``base=``, ``models=``/``task_vectors=``,
``weights=`` and ``output=DIR`` merge any Hugging Face folders (DIR is then the model folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig

from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import read_manifest
from cmmerge.io.model_card import copy_model_files, write_model_card
from cmmerge.merging.engine import TASK_VECTOR_FILE, merge_into_base, merge_models
from cmmerge.merging.methods import resolve_params
from cmmerge.models.loading import local_model_dir, resolve_model
from cmmerge.settings import merge_scale
from cmmerge.stages.ids import cli_hint, merge_id, method_name, stage_dirs
from cmmerge.stages.runner import folder_input, run_stage, stage_input

_DTYPES = ("float32", "float16", "bfloat16")


def method_params(cfg: DictConfig) -> dict:
    """The validated parameters of the configured method (density only where it applies)."""
    method = cfg.method
    return resolve_params(str(method.name), density=cfg.get("density"),
                          sign=method.get("sign"), normalize=method.get("normalize"))


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
    if cfg.get("models"):
        paths = [local_model_dir(str(p)) for p in cfg.models]
        return paths, True, [folder_input(p) for p in paths]
    extract = dirs["extract"]
    return [extract / TASK_VECTOR_FILE], False, [stage_input(extract, cli_hint(cfg, "extract"))]


def _weights(cfg: DictConfig, n: int) -> list[float]:
    weights = cfg.get("weights")
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise CmmergeError(f"weights has {len(weights)} values for {n} sources")
    return weights


def _output_dirs(cfg: DictConfig, dirs: dict) -> tuple[Path, Path]:
    """(stage folder holding the manifest, model folder)."""
    if not cfg.get("output"):
        return dirs["merge"], dirs["merge"] / "model"
    out = Path(str(cfg.output)).expanduser()
    if out.exists() and any(out.iterdir()) and read_manifest(out) is None \
            and not (out / ".cmmerge-partial").exists():
        raise CmmergeError(f"output={out} exists and is not a cmmerge merge: choose a new folder "
                           "(cmmerge never overwrites other files)")
    return out, out


def run(cfg: DictConfig) -> dict:
    dirs = stage_dirs(cfg)
    params = method_params(cfg)
    scale = merge_scale(cfg)
    if cfg.get("dtype") and str(cfg.dtype) not in _DTYPES:
        raise CmmergeError(f"dtype={cfg.dtype}: choose one of {', '.join(_DTYPES)}")
    base = local_model_dir(str(cfg.base)) if cfg.get("base") else resolve_model(cfg)
    sources, are_models, source_inputs = _sources(cfg, dirs)
    weights = _weights(cfg, len(sources))
    stage_dir, model_dir = _output_dirs(cfg, dirs)
    config_view = {"method": method_name(cfg), "lambda": scale, "weights": weights,
                   "params": params, "dtype": cfg.get("dtype"),
                   "sources": [str(s) for s in sources]}

    def work(_stage_dir):
        import torch

        if model_dir.exists():  # an earlier (unfinished or outdated) merge of ours
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        marker = model_dir / ".cmmerge-partial"
        marker.touch()
        merge = merge_models if are_models else merge_into_base
        dtype = getattr(torch, str(cfg.dtype)) if cfg.get("dtype") else None
        stats = merge(base, sources, weights, method_name(cfg), scale, model_dir,
                      density=params.get("density"), sign=params.get("sign"),
                      normalize=params["normalize"], dtype=dtype)
        copy_model_files(base, model_dir)
        record = {"method": method_name(cfg), "lambda": scale, **params, "weights": weights,
                  "base": str(base), "sources": [str(s) for s in sources]}
        (model_dir / "merge.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        write_model_card(model_dir, f"{merge_id(cfg)} merge",
                         f"`{base}` merged with {len(sources)} task vector(s) by cmmerge "
                         f"({method_name(cfg)}).", {**record, "sources": ", ".join(
                             f"{i['path']} ({i.get('manifest_sha256') or i.get('fingerprint') or i.get('size')})"
                             for i in source_inputs)})
        marker.unlink()
        return {"metrics": {k: stats[k] for k in ("n_merged", "n_copied") if k in stats},
                "outputs": ["model/" if model_dir != stage_dir else "."], "merge": stats}

    return run_stage(cfg, "merge", stage_dir, config_view,
                     [folder_input(base), *source_inputs], work)
