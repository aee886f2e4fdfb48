"""Config mistakes on the command line, caught before Hydra runs and told in cmmerge's voice.

Unknown keys and unknown options of a config group get one line with a "did you mean" taken
from the real keys or choices (difflib); a value of the wrong type names the key and the type it
needs; a malformed override says what the syntax is. :func:`check_overrides` raises
:class:`CmmergeError`; the CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from cmmerge.config.keys import KEYS
from cmmerge.config.sections import SECTION_KEYS
from cmmerge.errors import CmmergeError
from cmmerge.presets import CONFIG_DIR, check_run_name, group_options, use_config_dirs

# Hydra's own command-line options that take a value (``--cfg job``, ``-p PACKAGE``...).
_OPTIONS_WITH_VALUE = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--info",
    "-i",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
}
_ABSENT = object()


def override_args(args: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides among a stage's arguments (Hydra's options left out)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            if "=" not in arg:
                continue
        if arg.startswith("-"):
            skip = arg in _OPTIONS_WITH_VALUE
            continue
        out.append(arg)
    return out


def config_groups() -> list[str]:
    """Names of the config groups (folders of option files under configs/)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def _suggest(word: str, choices: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a config (inner nodes too), list items left out."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            yield path
            yield from _paths(node._get_node(key), path + ".")


def _parse(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as err:
            hint = (
                "drop the brackets: in the README they mark an optional part"
                if text.startswith("[") and text.endswith("]")
                else "write key=value, key=[a,b] for a list, key=a,b for a sweep"
            )
            raise CmmergeError(
                f"cannot read {text!r} ({str(err).splitlines()[0]}): {hint}"
            ) from None
    return parsed


def _values(override) -> list[Any]:
    """The values an override sets: one, or each value of a choice or range sweep."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    if not override.is_sweep_override():
        return [override.value()]
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return list(value.list)
    if isinstance(value, RangeSweep):
        return list(override.sweep_iterator())
    return []  # interval and glob sweeps: not checked


def _check_group(group: str, override) -> None:
    options = group_options(group)
    for value in _values(override):
        if value is None or str(value) in options:
            continue
        close = _suggest(str(value), options)
        lead = f"unknown {group} '{value}'"
        lead += f": did you mean {group}={close}? (" if close else "; "
        raise CmmergeError(f"{lead}choose one of: {', '.join(options)}" + (")" if close else ""))


def _unknown_key(key: str, cfg: DictConfig, stage: str) -> CmmergeError:
    paths = [p for p in _paths(cfg) if not p.startswith("hydra")]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [p for p in paths if p.endswith("." + leaf)] if "." not in key else []
    close = same_leaf[:3] or difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    if close:
        return CmmergeError(f"unknown key '{key}': did you mean {' or '.join(close)}?")
    return CmmergeError(
        f"unknown key '{key}' (`cmmerge {stage} --cfg job` lists the keys; +{key}=... adds one)"
    )


def _expected(default: Any) -> str | None:
    """What a key whose default is ``default`` takes, or None when anything goes."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int | float):
        return "a number"
    if isinstance(default, ListConfig | list):
        return "a list"
    if isinstance(default, DictConfig | dict):
        return "a mapping"
    return None


def _fits(value: Any, expected: str) -> bool:
    if value is None or (isinstance(value, str) and "${" in value):
        return True
    if expected == "true or false":
        return isinstance(value, bool)
    if expected == "a number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected == "a list":
        return isinstance(value, list)
    return isinstance(value, dict)


_EXAMPLES = {"a number": "0.5", "true or false": "true", "a list": "[a,b]", "a mapping": "{k: v}"}


def _check_value(key: str, override, cfg: DictConfig) -> None:
    """Refuse a value of the wrong type: as a declared key says (``keys.KEYS``,
    ``sections.SECTION_KEYS``: type, choices, lowest value), else by the type of the key's
    default in the composed config."""
    declared = KEYS.get(key) or SECTION_KEYS.get(key)
    if declared is not None and declared.kind is not None:
        for value in _values(override):
            problem = declared.problem(value)
            if problem:
                raise CmmergeError(f"{key}={value}: {problem}")
        return
    default = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    expected = _expected(default)
    if expected is None:
        return
    for value in _values(override):
        if not _fits(value, expected):
            raise CmmergeError(
                f"{key}={value}: {key} takes {expected}, e.g. {key}={_EXAMPLES[expected]}"
            )


def _compose(stage: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        return compose(config_name=stage, overrides=overrides)


def _has_key(cfg: DictConfig, key: str) -> bool:
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


# Hydra launchers that are plugins: (module, the package that installs it); cmmerge's
# ``launchers`` extra installs joblib and submitit.
_LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    "rq": ("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher"),
}
_EXTRA = ("hydra-joblib-launcher", "hydra-submitit-launcher")


def _check_launcher(override) -> None:
    """A ``hydra/launcher=NAME`` whose plugin is not installed: one line naming it and what
    installs it (instead of Hydra's "Ambiguous value" for a sweep)."""
    import importlib

    for value in _values(override):
        known = _LAUNCHERS.get(str(value))
        if known is None:
            continue
        module, package = known
        try:
            importlib.import_module(module)
        except ImportError:
            extra = package in _EXTRA
            how = "pip install 'cmmerge[launchers]'" if extra else f"pip install {package}"
            raise CmmergeError(
                f"hydra/launcher={value}: the {value} launcher is not installed; {how} installs "
                f"it ({package}), or leave hydra/launcher out to run the jobs one after another"
            ) from None


_SEED_MAX = 2**32 - 1  # numpy's and torch's seeding take 0 .. 2**32 - 1


def _check_limits(key: str, override) -> None:
    """Values no stage can use, refused before Hydra makes anything: a run name leaving
    ``run.root`` (:func:`~cmmerge.presets.check_run_name`), a seed outside what the random
    number generators take."""
    if override.is_delete():
        return
    leaf = key.rsplit(".", 1)[-1]
    for value in _values(override):
        if key == "run.name":
            check_run_name(value)
        elif (
            (leaf == "seed" or leaf.endswith("_seed"))
            and isinstance(value, int)
            and not (0 <= value <= _SEED_MAX and not isinstance(value, bool))
        ):
            raise CmmergeError(
                f"{key}={value}: a seed is a whole number from 0 to {_SEED_MAX}, e.g. {key}=0"
            )


def _dirs(override) -> list[Path]:
    """The folders (``file://DIR``) of a ``hydra.searchpath`` override; a missing one: one line."""
    value = override.value()
    out = []
    for entry in value if isinstance(value, list) else [value]:
        text = str(entry)
        if not text.startswith("file://"):
            continue  # pkg:// and the like: Hydra's own
        folder = Path(text.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise CmmergeError(
                f"hydra.searchpath: no folder {folder} (write hydra.searchpath=[file:///abs/dir],"
                " a folder holding group folders such as experiment/)"
            )
        out.append(folder)
    return out


def _checked_groups(parsed: list, multirun: bool) -> tuple[list[str], list]:
    """Check each override's limits, launcher and group option; returns the group choices
    (``group=option``, for composing) and the key overrides left to check against the config.
    Hydra's own keys and ``~``/``+``/``++`` overrides are left to Hydra."""
    groups = set(config_groups())
    searchpath = [o for o in parsed if o.key_or_group == "hydra.searchpath"]
    use_config_dirs([d for o in searchpath for d in _dirs(o)])
    chosen, keys = [o.input_line for o in searchpath], []  # composing finds the user's files
    for o in parsed:
        name = o.key_or_group
        _check_limits(name, o)
        if name == "hydra/launcher":
            _check_launcher(o)
        if name.startswith("hydra") or o.is_delete() or o.is_add() or o.is_force_add():
            continue
        if o.is_sweep_override() and not multirun:
            raise CmmergeError(
                f"{o.input_line} gives several values, which is a sweep: use `cmmerge sweep`, "
                "add -m, or write a list as key=[a,b]"
            )
        if name not in groups:
            keys.append(o)
            continue
        _check_group(name, o)
        first = _values(o)[:1] or [None]
        if first[0] is not None:
            chosen.append(f"{name}={first[0]}")
    return chosen, keys


def check_overrides(
    stage: str, overrides: list[str], multirun: bool = False, defer_keys: bool = False
) -> Callable[[DictConfig], None] | None:
    """Refuse unknown keys, unknown group options, values of the wrong type and malformed
    overrides of ``cmmerge <stage> ...`` with one line; anything else is left to Hydra.

    Key names and value types are checked against the stage's config composed with the
    overrides' group choices. With ``defer_keys`` that check is returned instead of run (None
    when there is no key to check): the caller runs it on the config Hydra composes for the
    command itself, before Hydra applies the overrides, so the config is composed once."""
    chosen, keys = _checked_groups(_parse(overrides), multirun)
    if not keys:
        return None

    def check_keys(cfg: DictConfig) -> None:
        for o in keys:
            if not _has_key(cfg, o.key_or_group):
                raise _unknown_key(o.key_or_group, cfg, stage)
            _check_value(o.key_or_group, o, cfg)

    if defer_keys:
        return check_keys
    try:
        cfg = _compose(stage, chosen)
    except Exception as err:  # noqa: BLE001 - Hydra's message, on one line
        raise CmmergeError(" ".join(str(err).split())) from None
    check_keys(cfg)
    return None
