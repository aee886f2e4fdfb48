"""The files shipped with cmmerge: its config groups (``configs/``) and data samples, and the
plain-Python form of a config node. Read by every layer; it reads no composed config (that is
:mod:`cmmerge.config`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from cmmerge.errors import CmmergeError

PACKAGE_ROOT = Path(str(resources.files("cmmerge")))
CONFIG_DIR = PACKAGE_ROOT / "configs"
SAMPLES_DIR = PACKAGE_ROOT / "samples"


def plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts, lists, scalars)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


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


_USER_DIRS: list[Path] = []  # the user's config folders of this command (hydra.searchpath)


def use_config_dirs(dirs: list[Path]) -> None:
    """Config folders of the user's (``hydra.searchpath=[file://DIR]``) that this command's
    groups are read from too, after cmmerge's own (``DIR/experiment/mine.yaml``)."""
    _USER_DIRS[:] = [Path(d) for d in dirs]


def _group_files(group: str) -> list[Path]:
    """The YAML files of a group: cmmerge's own, then the user's folders' (a name already
    taken keeps cmmerge's, as Hydra's search path does)."""
    files: dict[str, Path] = {}
    for root in (CONFIG_DIR, *_USER_DIRS):
        for path in sorted((root / group).glob("*.yaml")):
            files.setdefault(path.stem, path)
    return list(files.values())


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``task``, ``model``, ...): its YAML files
    (cmmerge's and the user's config folders') and the options stored in Hydra's ConfigStore
    (``train``'s ``default``, see :mod:`cmmerge.config.sections`)."""
    from hydra.core.config_store import ConfigStore

    import cmmerge.configs  # noqa: F401 - importing it stores them

    stored = ConfigStore.instance().repo.get(group, {})
    names = {p.stem for p in _group_files(group)}
    return sorted(names | {n.removesuffix(".yaml") for n in stored if isinstance(n, str)})


def load_group_config(group: str, name: str) -> Any:
    """Load ``configs/<group>/<name>.yaml`` (or a user's config folder's) on its own (e.g.
    another task for transfer)."""
    path = next((p for p in _group_files(group) if p.stem == name), None)
    if path is None:
        raise CmmergeError(
            f"unknown {group} '{name}'; choose one of: {', '.join(group_options(group))}"
        )
    node = OmegaConf.load(path)
    if "defaults" in node:
        node = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
    return node
