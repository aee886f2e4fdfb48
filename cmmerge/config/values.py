"""Typed reads of the composed Hydra config: numbers, flags and the folders it names.

``lambda`` is a Python keyword: it lives only in YAML and on the command line, and Python reads it
here, in :func:`merge_scale`, and nowhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cmmerge.errors import CmmergeError
from cmmerge.presets import SAMPLES_DIR, check_run_name, load_group_config
from cmmerge.stages.runner import RunContext


def _typed(cfg: DictConfig, key: str, kind: type, example: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    if isinstance(value, bool) and kind is not bool:
        value = str(value).lower()  # true/false is no number
    if kind is bool:
        if isinstance(value, bool):
            return value
    else:
        try:
            number = kind(value)
            if kind is int and isinstance(value, float) and number != value:
                raise ValueError(value)
            return number
        except (TypeError, ValueError):
            pass
    name = {int: "an integer", float: "a number", bool: "true or false"}[kind]
    raise CmmergeError(f"{key}={value}: expected {name}, e.g. {key}={example}")


def config_float(cfg: DictConfig, key: str, example: str = "0.5") -> float:
    """``cfg.<key>`` (dotted) as a float, or a one-line error naming the key and the type."""
    return _typed(cfg, key, float, example)


def config_int(cfg: DictConfig, key: str, example: str = "1") -> int:
    """``cfg.<key>`` (dotted) as an int, or a one-line error naming the key and the type."""
    return _typed(cfg, key, int, example)


def config_bool(cfg: DictConfig, key: str) -> bool:
    """``cfg.<key>`` (dotted) as a bool (true/false), or a one-line error."""
    return _typed(cfg, key, bool, "true")


def merge_scale(cfg: DictConfig) -> float:
    """The merge scale ``lambda`` of the config (the one place Python reads that key)."""
    return config_float(cfg, "lambda")


def data_root(cfg: DictConfig) -> Path:
    """Root of the data folders: ``data.root``, or the samples shipped with cmmerge."""
    root = cfg.data.get("root")
    path = Path(root).expanduser() if root else SAMPLES_DIR
    if not path.is_dir():
        raise CmmergeError(f"data.root={root}: no such folder")
    return path


def cache_dir(cfg: DictConfig) -> Path:
    """Where built tiny models are cached: ``cache_dir``, $CMMERGE_CACHE or ~/.cache/cmmerge."""
    configured = cfg.get("cache_dir") or os.environ.get("CMMERGE_CACHE")
    path = Path(configured).expanduser() if configured else Path.home() / ".cache" / "cmmerge"
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(cfg: DictConfig) -> Path:
    """The run directory ``${run.root}/${run.name}`` (its name checked: :func:`check_run_name`)."""
    return Path(cfg.run.root).expanduser() / check_run_name(cfg.run.name)


def task_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config of task ``name``: the composed one when it is the current task, else its file."""
    if cfg.task.name == name:
        return cfg.task
    return load_group_config("task", name)


def split_seed(cfg: DictConfig) -> int:
    """Seed of carved-out validation splits: fixed across training seeds (``data.split_seed``)."""
    return int(cfg.data.get("split_seed", 0))


def leakage_tasks(cfg: DictConfig) -> list[str]:
    """Tasks whose validation and test texts must never be in a CPT corpus: ``data.leakage_tasks``
    plus the configured task and ``eval_tasks``."""
    names = [str(n) for n in cfg.data.get("leakage_tasks") or []]
    for name in [str(cfg.task.name), *[str(t) for t in cfg.get("eval_tasks") or []]]:
        if name not in names:
            names.append(name)
    return names


def run_context(cfg: DictConfig) -> RunContext:
    """What the runner takes from a command besides the stage: the run directory, ``force``,
    the seed it records, and the Hydra job's name and overrides (none outside Hydra)."""
    seed = cfg.get("seed")
    try:
        hydra = HydraConfig.get()
        command, overrides = str(hydra.job.name), tuple(hydra.overrides.task)
    except ValueError:  # not under Hydra (a test, a pipeline called directly)
        command, overrides = None, ()
    return RunContext(
        run_root=str(cfg.run.root),
        run_name=check_run_name(cfg.run.name),
        force=bool(cfg.get("force")),
        seed=None if seed is None else int(seed),
        command=command,
        overrides=overrides,
    )


def hydra_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job ([] outside Hydra)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (tests, pipeline called directly)
        return []


def config_folders(cfg: DictConfig) -> list[dict]:
    """The model folders a config names (``init=DIR``, ``base=``, ``models=``,
    ``model.name_or_path``), as inputs for :func:`as_user_error`."""
    named = [cfg.get("init"), cfg.get("base"), *(cfg.get("models") or [])]
    model = cfg.get("model")
    if model is not None and hasattr(model, "get"):
        named.append(model.get("name_or_path"))
    return [{"path": str(p)} for p in named if p and Path(str(p)).expanduser().is_dir()]
