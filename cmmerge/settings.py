"""Small helpers over the composed Hydra config: paths, group lookups, plain containers.

``lambda`` is a Python keyword: it lives only in YAML and on the command line, and Python reads it
here, in :func:`merge_scale`, and nowhere else.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmmerge.errors import CmmergeError

PACKAGE_ROOT = Path(str(resources.files("cmmerge")))
CONFIG_DIR = PACKAGE_ROOT / "configs"
SAMPLES_DIR = PACKAGE_ROOT / "samples"


def plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, scalars)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


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


def check_run_name(name: object) -> str:
    """``run.name`` as given, when it names a folder inside ``run.root``: not absolute, not
    empty, and not leaving ``run.root`` once normalised (``a/../..``); else one line."""
    text = str(name)
    normal = os.path.normpath(text) if text.strip() else ""
    if (
        os.path.isabs(text)
        or text.startswith("~")
        or normal in ("", ".")
        or (normal == ".." or normal.startswith(".." + os.sep))
    ):
        raise CmmergeError(
            f"run.name={text}: a run name must name a folder inside run.root (no absolute "
            "path, no '..' leading out of it); set run.root to choose where runs go"
        )
    return text


def run_dir(cfg: DictConfig) -> Path:
    """The run directory ``${run.root}/${run.name}`` (its name checked: :func:`check_run_name`)."""
    return Path(cfg.run.root).expanduser() / check_run_name(cfg.run.name)


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``task``, ``model``, ...)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def load_group_config(group: str, name: str) -> DictConfig:
    """Load ``configs/<group>/<name>.yaml`` on its own (e.g. another task for transfer)."""
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise CmmergeError(
            f"unknown {group} '{name}'; choose one of: {', '.join(group_options(group))}"
        )
    node = OmegaConf.load(path)
    if "defaults" in node:
        node = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    return node


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
