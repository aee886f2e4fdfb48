"""Typed specs of the stages: the one place a stage's identity comes from.

A spec is a frozen (hashable) dataclass built once from the composed Hydra config at the stage
boundary (:func:`spec_for`, or ``<Stage>Spec.from_config(cfg)``). It holds every setting that
changes the stage's outputs, typed (ints, floats, tuples, nested specs for the upstream stages,
and :class:`FrozenMap` for the free-form sections: ``task``, ``cpt``, ``finetune``, ``peft``...).
Everything that names or checks a stage is derived from it, so they cannot disagree:

- ``spec.folder_id`` / ``spec.folder``: the stage's folder in the run directory
  (:func:`cmmerge.config.ids.stage_dirs` gathers them). The readable part names what is
  usually varied (``ties-l0.5-d0.2``); every other setting that differs from its preset adds
  a short hash.
- ``spec.config_view()``: the manifest's ``config``, which
  :func:`cmmerge.io.manifest.fingerprint` hashes (less
  :data:`~cmmerge.io.manifest.NOT_OUTPUT_SETTINGS`) into the stage's fingerprint, and
  ``spec.fingerprint(inputs)``, that hash.
- ``spec.cli_hint()``: the command that makes the stage, named in the errors of its consumers.

Each field is declared once, with :func:`setting`: where ``from_config`` reads it, its key in
the recorded view (or none: it names the folder), how it is written there, whether the stage
fills it in, and its key in the CLI hint; ``from_config``, ``config_view``, ``settings_view``,
``resolve`` and ``hint_keys`` are derived from those declarations (:class:`StageSpec`), and a
new setting is one line. A few values are known only once the stage has looked at its inputs
(the labels inferred from a train file, the folder fine-tuning starts from, the files a merge
reads, the dtype a device supports): they are declared ``resolved`` (``None`` until the stage
fills them in with :meth:`StageSpec.resolve`); the folder id never reads them.
``config_view()`` is exactly the dict each stage recorded before the specs existed, so the
fingerprints of finished stages do not change (tests/test_specs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf, open_dict

from cmmerge.config.keys import KEYS, range_problem
from cmmerge.config.values import (
    config_bool,
    config_float,
    config_int,
    leakage_tasks,
    merge_scale,
    split_seed,
    task_config,
)
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import ARM_TASK_LISTS, NOT_OUTPUT_SETTINGS, fingerprint
from cmmerge.merging.methods import get_method, resolve_params
from cmmerge.presets import CONFIG_DIR, SAMPLES_DIR, load_group_config, plain
from cmmerge.reporting import variants
from cmmerge.stages.registry import STAGES

# Settings left out of the folder hash: those that only change how fast or how verbosely a stage
# runs (shared with the fingerprint), and the arms' task lists, which the readable part names.
NOT_IN_ID = NOT_OUTPUT_SETTINGS | ARM_TASK_LISTS
GRAFT = "graft"  # init=graft: tau_cpt added to a fine-tuned model (``cmmerge graft``)
_SEED_SUFFIX = re.compile(r"-s\d+$")


# --- immutable values ---------------------------------------------------------------------------


class FrozenMap(Mapping):
    """An immutable, hashable mapping (a config section inside a spec); :func:`thaw` gives the
    plain dict back, in its order."""

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping | None = None) -> None:
        pairs = tuple((str(k), freeze(v)) for k, v in (items or {}).items())
        object.__setattr__(self, "_items", pairs)
        object.__setattr__(self, "_dict", dict(pairs))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is immutable")

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items, key=lambda kv: kv[0])))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"

    def replace(self, **values: Any) -> FrozenMap:
        """A copy with ``values`` set."""
        return FrozenMap({**thaw(self), **values})


def freeze(value: Any) -> Any:
    """A config value as an immutable one: mappings -> :class:`FrozenMap`, lists -> tuples."""
    value = plain(value)
    if isinstance(value, FrozenMap):
        return value
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain (JSON-able) value back: :class:`FrozenMap` -> dict, tuples -> lists."""
    if isinstance(value, FrozenMap):
        return {k: thaw(v) for k, v in value._items}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _section(cfg: DictConfig, key: str) -> FrozenMap | None:
    node = plain(cfg.get(key))
    return None if node is None else freeze(node)


# --- naming helpers -----------------------------------------------------------------------------


def num(x: float) -> str:
    """A number as a folder name writes it: ``0.5``, ``1``, ``1e-05``."""
    return f"{float(x):g}"


def short_hash(obj: Any) -> str:
    """Six hex digits identifying ``obj`` (a plain, JSON-able value)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


@cache
def _train_presets() -> dict[str, Any]:
    """``{preset: its config}`` of every ``train`` preset: ``default`` (the declared defaults,
    :mod:`cmmerge.config.sections`) and each file of ``configs/train``, over ``default`` when
    its defaults list names it (each file read once)."""
    from cmmerge.config.sections import OPTION, defaults

    presets: dict[str, Any] = {OPTION: defaults()}
    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        node = OmegaConf.load(path)
        own = OmegaConf.masked_copy(node, [k for k in node if k != "defaults"])
        if OPTION in node.get("defaults", []):
            own = OmegaConf.merge(defaults(), own)
        presets[path.stem] = OmegaConf.to_container(own, resolve=False)
    return dict(sorted(presets.items()))


@cache
def _presets(section: str) -> dict[str, dict]:
    """``{preset: settings}`` of a section (``cpt``, ``finetune``) in every ``train`` preset."""
    return {
        name: node[section]
        for name, node in _train_presets().items()
        if isinstance(node, dict) and isinstance(node.get(section), dict)
    }


def differences(settings: Mapping, section: str) -> dict:
    """The settings that differ from the closest ``train`` preset (with that preset's name)."""
    settings = {k: v for k, v in thaw(settings).items() if k not in NOT_IN_ID}
    best: dict | None = None
    for name, preset in _presets(section).items():
        diff = {k: v for k, v in settings.items() if preset.get(k, object()) != v}
        if best is None or len(diff) < len(best) - 1:
            best = {"preset": name, **diff}
    if best is None or len(best) == 1:
        return {}
    return best


def _suffix(diff: dict) -> str:
    return f"-{short_hash(diff)}" if diff else ""


@cache
def _default_lora() -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "peft" / "lora.yaml"))
    return {k: v for k, v in node.items() if k != "targets_by_family"}


def _peft_name(peft: FrozenMap | None) -> str:
    return str((peft or {}).get("name", "none"))


def _cpt_peft(value: Any) -> dict:
    """The peft section ``cpt_peft`` names: a preset of the ``peft`` group (``none``, ``lora``),
    or a mapping with its ``name`` and the settings that replace the preset's."""
    if isinstance(value, str):
        name, settings = value, {}
    elif isinstance(value, Mapping) and value.get("name"):
        settings = dict(value)
        name = str(settings["name"])
    else:
        raise CmmergeError(
            f"cpt_peft={value!r}: give null (CPT follows peft), none, lora, or a mapping "
            "such as 'cpt_peft={name: lora, r: 16}'"
        )
    return {**plain(load_group_config("peft", name)), **settings}


def cpt_peft_section(cfg: DictConfig) -> FrozenMap | None:
    """The peft section CPT trains with: ``cpt_peft`` when set, else the top-level ``peft``.

    ``peft`` alone drives CPT and fine-tuning alike (``peft=lora``: LoRA for both);
    ``cpt_peft=none peft=lora`` is full CPT, then LoRA fine-tuning of the CPT or merged model
    (and ``cpt_peft=lora peft=none`` the reverse). A run that does not set it keeps its
    folder names and fingerprints."""
    own = plain(cfg.get("cpt_peft"))
    return _section(cfg, "peft") if own is None else freeze(_cpt_peft(own))


def _peft_differences(peft: FrozenMap | None) -> dict:
    """``{"peft": settings}`` when LoRA's settings differ from ``peft/lora.yaml``'s."""
    if _peft_name(peft) == "none":
        return {}
    settings = {k: v for k, v in thaw(peft).items() if k != "targets_by_family"}
    return {} if settings == _default_lora() else {"peft": settings}


def _data_root(cfg: DictConfig) -> str:
    """``data.root`` as the stages record it (checked by :func:`cmmerge.config.values.data_root`
    when the stage reads data; a spec only names it)."""
    root = cfg.data.get("root")
    return str(Path(root).expanduser() if root else SAMPLES_DIR)


def _hint(run_root: str, run_name: str, stage: str, *extra: str) -> str:
    return " ".join(["cmmerge", stage, f"run.root={run_root}", f"run.name={run_name}", *extra])


def method_name(cfg: DictConfig) -> str:
    """Canonical merge method name (``tv`` -> ``task_arithmetic``)."""
    return get_method(str(cfg.method.name)).name


def source_names(cfg: DictConfig) -> list[str]:
    """What a run-directory merge combines: ``cpt`` (default) and/or task names (tau of the
    model fine-tuned on that task from the base)."""
    return [str(s) for s in (cfg.get("sources") or ["cpt"])]


def onto_task(cfg: DictConfig) -> str:
    """The task whose fine-tune (from the base) a graft adds tau_cpt to (``onto``)."""
    onto = cfg.get("onto")
    if not onto:
        raise CmmergeError("init=graft needs onto=TASK: the task whose fine-tune gets tau_cpt")
    return str(onto)


# --- declaring a setting -----------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How a spec field is declared, once: where :meth:`StageSpec.from_config` reads it
    (``source``: a dotted config key, checked as ``kind`` when given, or a function of the
    config; None: the stage fills it in, or it is a default), its key in the recorded config
    (``view``; None: it names the folder instead), how it is written there (``show``), whether
    the stage resolves it when it runs (``resolved``), its key in the command that makes the
    stage (``hint``: a format such as ``"seed={}"`` or a function of the value), and the values
    a dotted key accepts (``choices``; ``low``: the smallest number), refused in one line."""

    source: str | Callable[[DictConfig], Any] | None = None
    kind: type | None = None
    view: str | bool | None = None
    show: Callable[[Any], Any] | None = None
    resolved: bool = False
    hint: str | Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None


def setting(
    default: Any = None,
    source: str | Callable[[DictConfig], Any] | None = None,
    *,
    kind: type | None = None,
    view: str | bool = True,
    show: Callable[[Any], Any] | None = None,
    resolved: bool = False,
    hint: str | Callable[[Any], str | None] | None = None,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
) -> Any:
    """A spec field declared by a :class:`Setting` (``view=True``: recorded under its own name).
    A shared top-level key (``source`` in :data:`~cmmerge.config.keys.KEYS`) brings its type and
    allowed values from its one declaration there."""
    shown = None if view is False else view
    shared = KEYS.get(source) if isinstance(source, str) else None
    if shared is not None:
        if (kind, choices, low) != (None, None, None):
            raise TypeError(f"{source!r} is declared in cmmerge.config.keys: not again here")
        kind, choices, low = shared.kind, shared.choices, shared.low
    declared = Setting(source, kind, shown, show, resolved, hint, choices, low)
    return dataclasses.field(default=default, metadata={"setting": declared})


_TYPED: dict[type, Callable[[DictConfig, str], Any]] = {
    int: config_int,
    float: config_float,
    bool: config_bool,
}


def _read(declared: Setting, cfg: DictConfig) -> Any:
    """A setting's value from the composed config, typed and frozen (a wrong type: one line)."""
    source = declared.source
    if callable(source):
        return freeze(source(cfg))
    kind = declared.kind
    if kind in _TYPED:
        value = _TYPED[kind](cfg, str(source))
    else:
        value = OmegaConf.select(cfg, str(source))
        if kind is str and value is not None:
            value = str(value)
    _check_range(declared, str(source), value)
    return freeze(value)


def _check_range(declared: Setting, key: str, value: Any) -> None:
    """One line when ``value`` of ``key`` is not among the declared choices or below ``low``
    (an unset value, None or empty, is left to the default)."""
    if value is None or value == "":
        return
    problem = range_problem(value, declared.choices, declared.low)
    if problem:
        raise CmmergeError(f"{key}={value}: {problem}")


def _shown_dtype(dtype: str | None) -> str:
    return dtype or "float32"  # what is written


def _shown_shard_size(value: Any) -> int:
    from cmmerge.io.checkpoint import DEFAULT_MAX_SHARD_SIZE

    return shard_bytes(value or DEFAULT_MAX_SHARD_SIZE)


def _data_root_source() -> Any:
    return setting("", _data_root)


def _split_seed_source() -> Any:
    return setting(0, split_seed)


def _task_hint(task: dict) -> str:
    return f"task={task['name']}"


# --- the specs ----------------------------------------------------------------------------------


@cache
def _declared(cls: type) -> tuple[tuple[str, Setting], ...]:
    """``(field, its Setting)`` of every declared field of ``cls``, ``view=True`` made the
    field's own name."""
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("setting")
        if declared is not None:
            own = declared.view is True
            out.append((f.name, dataclasses.replace(declared, view=f.name) if own else declared))
    return tuple(out)


@dataclass(frozen=True)
class StageSpec:
    """What every spec has: where its run directory is, and what its declared settings
    (:func:`setting`) give: :meth:`from_config`, :meth:`config_view`, :meth:`settings_view`,
    :meth:`resolve` and :meth:`hint_keys`. Subclasses name their stage (``STAGE``, the folder
    under the run directory) and write their folder id."""

    run_root: str = setting("", "run.root", view=False)
    run_name: str = setting("", "run.name", view=False)

    STAGE: ClassVar[str] = ""

    @classmethod
    def declared(cls) -> tuple[tuple[str, Setting], ...]:
        """``(field, its Setting)`` of every declared field, in order."""
        return _declared(cls)

    @classmethod
    def resolved_fields(cls) -> tuple[str, ...]:
        """The fields the stage fills in when it runs (:meth:`resolve`)."""
        return tuple(name for name, s in cls.declared() if s.resolved)

    @classmethod
    def not_in_view(cls) -> frozenset[str]:
        """The fields that name the folder (or an upstream stage) instead of being recorded."""
        return frozenset(name for name, s in cls.declared() if s.view is None)

    @classmethod
    def from_config(cls, cfg: DictConfig, **values: Any) -> StageSpec:
        """The spec the composed config gives (``values``: fields set instead of read)."""
        read = {
            name: _read(s, cfg)
            for name, s in cls.declared()
            if s.source is not None and name not in values
        }
        return cls(**read, **{k: freeze(v) for k, v in values.items()})

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root).expanduser() / self.run_name

    @property
    def folder_id(self) -> str:
        raise NotImplementedError

    @property
    def folder(self) -> Path:
        """The stage's folder in the run directory."""
        return self.run_dir / self.STAGE / self.folder_id

    def _view(self, partial: bool) -> dict[str, Any]:
        view: dict[str, Any] = {}
        for name, s in self.declared():
            if s.view is None:
                continue
            if s.resolved and getattr(self, name) is None:
                if partial:
                    continue
                raise RuntimeError(f"{type(self).__name__}.{name} is not resolved yet")
            value = thaw(getattr(self, name))
            view[s.view] = s.show(value) if s.show else value
        return {**view, **self.derived_view()}

    def config_view(self) -> dict[str, Any]:
        """The manifest's ``config`` (what the fingerprint hashes): every recorded setting."""
        return self._view(partial=False)

    def settings_view(self) -> dict[str, Any]:
        """The config view less the settings the stage fills in when it runs: what a plan can
        compare with a finished stage's recorded config before running it."""
        return self._view(partial=True)

    def derived_view(self) -> dict[str, Any]:
        """Recorded values that follow from other fields (none by default)."""
        return {}

    def fingerprint(self, inputs: list[dict]) -> str:
        """The fingerprint of this stage made from ``inputs``."""
        return fingerprint(self.config_view(), inputs)

    def resolve(self, **values: Any) -> StageSpec:
        """A copy with the resolved fields the stage found (frozen)."""
        unknown = set(values) - set(self.resolved_fields())
        if unknown:
            kind = type(self).__name__
            raise TypeError(f"{kind} resolves {self.resolved_fields()}, not {unknown}")
        return dataclasses.replace(self, **{k: freeze(v) for k, v in values.items()})

    def cli_hint(self, *extra: str) -> str:
        """The command that makes this stage (``extra`` keys appended)."""
        return _hint(self.run_root, self.run_name, self.STAGE, *self.hint_keys(), *extra)

    def hint_keys(self) -> tuple[str, ...]:
        """The keys of the declared hints, in order."""
        keys = []
        for name, s in self.declared():
            if s.hint is None:
                continue
            value = thaw(getattr(self, name))
            key = s.hint.format(value) if isinstance(s.hint, str) else s.hint(value)
            if key:
                keys.append(key)
        return tuple(keys)


def _tokenized_model(cfg: DictConfig) -> Any:
    """The model whose tokenizer ``cmmerge data`` counts lengths with (``data.token_lengths``)."""
    return cfg.model if cfg.data.get("token_lengths", True) else None


@dataclass(frozen=True)
class RunFolderSpec(StageSpec):
    """A stage with one folder per run directory, named after the stage (``data/``,
    ``report/``)."""

    @property
    def folder(self) -> Path:
        return self.run_dir / self.STAGE

    @property
    def folder_id(self) -> str:
        return self.STAGE


@dataclass(frozen=True)
class DataSpec(RunFolderSpec):
    """``cmmerge data``: statistics of the task and the corpus -> ``data/``."""

    task: FrozenMap | None = setting(source="task")
    corpus: FrozenMap | None = setting(source="corpus")
    data: FrozenMap | None = setting(source="data")
    data_root: str = _data_root_source()
    seed: int = setting(0, "seed")
    cpt_seed: Any = setting(0, "cpt.seed")
    model: FrozenMap | None = setting(source=_tokenized_model)
    leakage_tasks: tuple[str, ...] = setting((), leakage_tasks)

    STAGE: ClassVar[str] = "data"


@dataclass(frozen=True)
class CptSpec(StageSpec):
    """``cmmerge cpt``: continued pre-training -> ``cpt/<corpus>[-lora][-<hash>]/``.

    The texts the leakage guard leaves are an input of the stage (their hash), not the list of
    tasks guarded: another task's pipeline that excludes no further text shares the CPT."""

    model: FrozenMap | None = setting(source="model")
    corpus: FrozenMap | None = setting(source="corpus")
    cpt: FrozenMap | None = setting(source="cpt")
    peft: FrozenMap | None = setting(source=cpt_peft_section)
    data_root: str = _data_root_source()
    split_seed: int = _split_seed_source()

    STAGE: ClassVar[str] = "cpt"

    @property
    def seed(self) -> int:
        return int(self.cpt["seed"])

    def derived_view(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @property
    def folder_id(self) -> str:
        """``<corpus>[-lora][-<hash>]``: the corpus, LoRA, and a hash of every other CPT setting
        that differs from its ``train`` preset (duration, learning rate, seed...)."""
        diff = {**differences(self.cpt, "cpt"), **_peft_differences(self.peft)}
        lora = "" if _peft_name(self.peft) == "none" else f"-{_peft_name(self.peft)}"
        return f"{self.corpus['name']}{lora}{_suffix(diff)}"


def _task_vector_paths(cfg: DictConfig) -> tuple[str, ...]:
    return tuple(str(Path(p).expanduser()) for p in cfg.get("task_vectors") or [])


@dataclass(frozen=True)
class ExtractSpec(StageSpec):
    """``cmmerge extract``: tau = theta_cpt - theta_base -> ``extract/<cpt-id>/``."""

    cpt: CptSpec | None = setting(source=CptSpec.from_config, view=False)
    model: FrozenMap | None = setting(source="model")
    dtype: str | None = setting(source="dtype")
    compare_with: tuple[str, ...] = setting((), _task_vector_paths)

    STAGE: ClassVar[str] = "extract"

    @property
    def folder_id(self) -> str:
        return self.cpt.folder_id


def shard_bytes(value: object) -> int:
    """``max_shard_size`` in bytes: an int or ``"500MB"``/``"2GB"``/``"1GiB"``."""
    text = str(value).strip().upper().replace("IB", "B")
    for suffix, mult in (("KB", 1024), ("MB", 1024**2), ("GB", 1024**3), ("B", 1)):
        if text.endswith(suffix):
            text, factor = text[: -len(suffix)], mult
            break
    else:
        factor = 1
    try:
        size = int(float(text) * factor)
    except ValueError:
        raise CmmergeError(f"max_shard_size={value}: give bytes or e.g. 500MB, 2GB") from None
    if size <= 0:
        raise CmmergeError(f"max_shard_size={value} must be positive")
    return size


def _merge_params(cfg: DictConfig) -> dict:
    m = cfg.method
    return resolve_params(
        method_name(cfg),
        density=cfg.get("density"),
        sign=m.get("sign"),
        normalize=m.get("normalize"),
        trim_scope=m.get("trim_scope"),
        seed=m.get("seed"),
    )


def _source_tasks(cfg: DictConfig) -> list[str]:
    return [s for s in source_names(cfg) if s != "cpt"]


def _run_merge_weights(cfg: DictConfig) -> tuple[float, ...] | None:
    """A run-directory merge's weights (a standalone merge, ``models=`` / ``task_vectors=``,
    records its weights with its sources)."""
    standalone = bool(cfg.get("models") or cfg.get("task_vectors"))
    if cfg.get("weights") is None or standalone:
        return None
    return tuple(float(w) for w in cfg.weights)


def _task_source_seed(cfg: DictConfig) -> int | None:
    return config_int(cfg, "seed") if _source_tasks(cfg) else None


def _source_finetunes(cfg: DictConfig) -> tuple[str, ...]:
    return tuple(
        _SEED_SUFFIX.sub("", source_finetune_spec(cfg, t).folder_id) for t in _source_tasks(cfg)
    )


@dataclass(frozen=True)
class MergeSpec(StageSpec):
    """``cmmerge merge``: theta_base + lambda * combine(tau...) ->
    ``merge/<method>-l<lambda>[-d<density>][-src_<sources>[_s<seed>]][-w<weights>][-<hash>]@<cpt-id>``.

    ``seed`` is set only when a source is a task (tau of a seeded fine-tune);
    ``source_finetunes`` are those fine-tunes' ids without their seed (their training
    settings); ``weights`` those of a run-directory merge (a standalone merge's are recorded
    with its sources). ``source_paths`` and ``source_weights`` are resolved by the stage."""

    method: str = setting("task_arithmetic", lambda cfg: method_name(cfg))
    scale: float = setting(1.0, merge_scale, view="lambda")
    params: FrozenMap | None = setting(source=_merge_params)
    sources: tuple[str, ...] = setting(("cpt",), lambda cfg: source_names(cfg), view=False)
    weights: tuple[float, ...] | None = setting(source=_run_merge_weights, view=False)
    dtype: str | None = setting(source="dtype", show=_shown_dtype)
    max_shard_size: Any = setting(source="max_shard_size", show=_shown_shard_size)
    allow_nonfinite: bool = setting(False, lambda cfg: bool(cfg.get("allow_nonfinite")))
    seed: int | None = setting(source=_task_source_seed, view=False)
    cpt: CptSpec | None = setting(source=CptSpec.from_config, view=False)
    source_finetunes: tuple[str, ...] = setting((), _source_finetunes, view=False)
    source_paths: tuple[str, ...] | None = setting(view="sources", resolved=True)
    source_weights: tuple[float, ...] | None = setting(view="weights", resolved=True)

    STAGE: ClassVar[str] = "merge"

    @property
    def tasks(self) -> list[str]:
        """The sources that are tasks (tau of the base fine-tuned on them)."""
        return [s for s in self.sources if s != "cpt"]

    @property
    def shard_bytes(self) -> int:
        """``max_shard_size`` in bytes (a bad value: one-line error)."""
        return _shown_shard_size(self.max_shard_size)

    @property
    def folder_id(self) -> str:
        """A source that is a task (tau of the base fine-tuned on it) comes from a seeded
        fine-tune: the seed follows the sources, and training settings of that fine-tune other
        than the preset's join the hash, so merges of different sources never share a folder."""
        out = f"{self.method}-l{num(self.scale)}"
        params = thaw(self.params)
        if "density" in params:
            out += f"-d{num(params.pop('density'))}"
        if self.sources != ("cpt",):
            out += "-src_" + "+".join(self.sources)
            if self.tasks:  # tau of a task comes from a seeded fine-tune: one merge per seed
                out += f"_s{self.seed}"
        if self.weights is not None:
            out += "-w" + "+".join(num(w) for w in self.weights)
        defaults = resolve_params(self.method, sign="sum", trim_scope="tensor", seed=0)
        diff = {k: v for k, v in params.items() if defaults.get(k) != v}
        if self.dtype is not None:
            diff["dtype"] = self.dtype
        # the sources' training settings (the seed is named above): the same for every seed
        if list(self.source_finetunes) != [f"base-{t}" for t in self.tasks]:
            diff["source_finetunes"] = list(self.source_finetunes)
        return f"{out}{_suffix(diff)}@{self.cpt.folder_id}"

    def hint_keys(self) -> tuple[str, ...]:
        keys = [f"method={self.method}", f"lambda={num(self.scale)}"]
        params = thaw(self.params)
        if "density" in params:
            keys.append(f"density={num(params['density'])}")
        defaults = resolve_params(self.method, sign="sum", trim_scope="tensor", seed=0)
        keys += [
            f"method.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in params.items()
            if k != "density" and defaults.get(k) != v
        ]
        if self.sources != ("cpt",):
            keys.append(f"sources=[{','.join(self.sources)}]")
        if self.seed is not None:
            keys.append(f"seed={self.seed}")
        if self.weights is not None:
            keys.append(f"weights=[{','.join(num(w) for w in self.weights)}]")
        if self.dtype is not None:
            keys.append(f"dtype={self.dtype}")
        return tuple(keys)


def init_spec(cfg: DictConfig) -> StageSpec | str:
    """What fine-tuning starts from: the spec of the CPT or merge it reads, or ``init`` itself
    (``base``, a folder)."""
    init = str(cfg.init)
    if init == "cpt":
        return CptSpec.from_config(cfg)
    if init == "merged":
        return MergeSpec.from_config(cfg)
    return init


def init_name(init: StageSpec | str) -> str:
    """The first part of a fine-tune's folder: base, ``cpt@<cpt-id>``, a merge id, or
    ``dir_<folder name>``."""
    if isinstance(init, CptSpec):
        return f"cpt@{init.folder_id}"
    if isinstance(init, MergeSpec):
        return init.folder_id
    if init == "base":
        return init
    return "dir_" + re.sub(r"[^A-Za-z0-9_.]+", "_", Path(init).name or "model")


@dataclass(frozen=True)
class FinetuneSpec(StageSpec):
    """``cmmerge finetune`` ->
    ``finetune/<init>-<task>[-seq_<tasks>][-joint_<tasks>][-lora][-<hash>]-s<seed>/``; the hash
    covers the training settings (lr, epochs, max_length, class weights...) that differ from
    the ``train`` preset, and LoRA settings other than the defaults. ``init_dir`` and
    ``labels`` are resolved by the stage."""

    init: str = setting("base", "init", hint="init={}")
    start: StageSpec | str = setting("base", init_spec, view=False)  # the CPT or merge read
    task: FrozenMap | None = setting(source="task", hint=_task_hint)
    finetune: FrozenMap | None = setting(source="finetune")
    peft: FrozenMap | None = setting(source="peft")
    seed: int = setting(0, "seed", hint="seed={}")
    data_root: str = _data_root_source()
    split_seed: int = _split_seed_source()
    init_dir: str | None = setting(resolved=True)
    labels: tuple[str, ...] | None = setting(resolved=True)

    STAGE: ClassVar[str] = "finetune"

    def derived_view(self) -> dict[str, Any]:
        return {"labels_inferred": self.labels_inferred}

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    @property
    def labels_inferred(self) -> bool:
        return self.task.get("labels") is None

    def task_list(self, key: str) -> list[str]:
        """``finetune.sequential`` / ``finetune.joint``."""
        return [str(t) for t in (self.finetune.get(key) or ())]

    @property
    def init_id(self) -> str:
        return init_name(self.start)

    @property
    def folder_id(self) -> str:
        parts = [self.init_id, self.task_name]
        if self.task_list("sequential"):
            parts.append("seq_" + "+".join(self.task_list("sequential")))
        if self.task_list("joint"):
            parts.append("joint_" + "+".join(self.task_list("joint")))
        if _peft_name(self.peft) != "none":
            parts.append(_peft_name(self.peft))
        diff = {**differences(self.finetune, "finetune"), **_peft_differences(self.peft)}
        return "-".join(parts) + _suffix(diff) + f"-s{self.seed}"


def source_finetune_spec(cfg: DictConfig, task: str) -> FinetuneSpec:
    """The fine-tune whose task vector a multi-source merge (or a graft) takes for ``task``:
    the base fine-tuned on it with this config's training settings and seed."""
    other = cfg.copy()
    with open_dict(other):
        other.init = "base"
        other.task = {"name": task}
        other.finetune.sequential = []
        other.finetune.joint = []
    return FinetuneSpec.from_config(other)


def _onto_finetune(cfg: DictConfig) -> str:
    return source_finetune_spec(cfg, onto_task(cfg)).folder_id


@dataclass(frozen=True)
class GraftSpec(StageSpec):
    """``cmmerge graft``: tau_cpt added to the base fine-tuned on ``onto`` ->
    ``finetune/<merge-id>+<onto fine-tune id without its seed>-<task>-s<seed>/``. It starts
    with the merge's ``<method>-l<lambda>`` so the report groups its lambdas into one family,
    and its source's id carries the training settings. ``labels`` is resolved by the stage."""

    onto: str = setting("", onto_task)
    merge: MergeSpec | None = setting(source=MergeSpec.from_config, view=False)
    onto_finetune: str = setting("", _onto_finetune, view=False)  # with its seed
    task: FrozenMap | None = setting(source="task")
    evaluate: FrozenMap | None = setting(source="evaluate")
    data_root: str = _data_root_source()
    split_seed: int = _split_seed_source()
    seed: int = setting(0, "seed")
    labels: tuple[str, ...] | None = setting(resolved=True)

    STAGE: ClassVar[str] = "finetune"
    init: ClassVar[str] = GRAFT

    def derived_view(self) -> dict[str, Any]:
        """The merge's settings (the graft is that merge, onto a fine-tune)."""
        return {
            "method": self.merge.method,
            "lambda": self.merge.scale,
            "params": thaw(self.merge.params),
            "dtype": _shown_dtype(self.merge.dtype),
        }

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    @property
    def init_id(self) -> str:
        return f"{self.merge.folder_id}+{_SEED_SUFFIX.sub('', self.onto_finetune)}"

    @property
    def folder_id(self) -> str:
        return f"{self.init_id}-{self.task_name}-s{self.seed}"

    def cli_hint(self, *extra: str) -> str:
        keys = [f"onto={self.onto}", f"task={self.task_name}", *self.merge.hint_keys()]
        if self.merge.seed is None:
            keys.append(f"seed={self.seed}")
        return _hint(self.run_root, self.run_name, "graft", *keys, *extra)


def finetune_spec(cfg: DictConfig) -> FinetuneSpec | GraftSpec:
    """The spec of the fine-tuned model ``cfg`` names: a fine-tune, or a graft (``init=graft``)."""
    if str(cfg.init) == GRAFT:
        return GraftSpec.from_config(cfg)
    return FinetuneSpec.from_config(cfg)


@dataclass(frozen=True)
class EvaluateSpec(StageSpec):
    """``cmmerge evaluate`` of one evaluation task -> ``evaluate/<finetune-id>/<task>/``.
    ``labels`` (what fine-tuning used) is resolved by the stage."""

    model: FinetuneSpec | GraftSpec | None = setting(source=finetune_spec, view=False)
    task: FrozenMap | None = setting(source=lambda cfg: task_config(cfg, str(cfg.task.name)))
    evaluate: FrozenMap | None = setting(source="evaluate")
    data_root: str = _data_root_source()
    split_seed: int = _split_seed_source()
    seed: int = setting(0, "seed")
    labels: tuple[str, ...] | None = setting(resolved=True)

    STAGE: ClassVar[str] = "evaluate"

    @classmethod
    def from_config(cls, cfg: DictConfig, task_name: str | None = None) -> EvaluateSpec:
        """The evaluation of the fine-tuned model ``cfg`` names on ``task_name`` (default: its
        task)."""
        values = {"task": task_config(cfg, task_name)} if task_name else {}
        return super().from_config(cfg, **values)

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    @property
    def folder_id(self) -> str:
        """The fine-tuned model's id (the folder holds one sub-folder per evaluation task)."""
        return self.model.folder_id

    @property
    def folder(self) -> Path:
        return self.run_dir / self.STAGE / self.folder_id / self.task_name

    def hint_keys(self) -> tuple[str, ...]:
        return (f"init={self.model.init}", f"task={self.model.task_name}", f"seed={self.seed}")


@cache
def _prompt_defaults() -> dict:
    return dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prompt.yaml").prompt))


def _prompted_model_name(cfg: DictConfig) -> str:
    model = cfg.model.get("name_or_path") or cfg.model.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model)).name or "model")


def _prompted_start(cfg: DictConfig) -> StageSpec | str:
    init_cfg = cfg.copy()
    with open_dict(init_cfg):
        init_cfg.init = cfg.prompt.init
    return init_spec(init_cfg)


@dataclass(frozen=True)
class PromptSpec(StageSpec):
    """``cmmerge prompt`` ->
    ``prompt/<model>-<init>-<task>-k<shots>-s<seed>[-norm][-<hash>]/``; the hash covers a
    template, verbalisers or max_length other than the defaults. ``dtype`` (what the device
    runs) is resolved by the stage."""

    model_name: str = setting("", _prompted_model_name, view=False)
    start: StageSpec | str = setting("base", _prompted_start, view=False)
    task: FrozenMap | None = setting(source="task", hint=_task_hint)
    prompt: FrozenMap | None = setting(source="prompt")
    normalize: bool = setting(False, "prompt.normalize", kind=bool)
    shots: int = setting(0, "shots", hint="shots={}")
    seed: int = setting(0, "seed", hint="seed={}")
    data_root: str = _data_root_source()
    split_seed: int = _split_seed_source()
    dtype: str | None = setting(resolved=True)

    STAGE: ClassVar[str] = "prompt"

    @property
    def folder_id(self) -> str:
        shape = {k: thaw(self.prompt.get(k)) for k in ("template", "verbalizers", "max_length")}
        diff = {k: v for k, v in shape.items() if _prompt_defaults().get(k) != v}
        return (
            f"{self.model_name}-{init_name(self.start)}-{self.task['name']}-k{self.shots}"
            f"-s{self.seed}{'-norm' if self.normalize else ''}"
            + (f"-{short_hash(diff)}" if diff else "")
        )


def configured(cfg: DictConfig) -> variants.Configured:
    """The fine-tune settings a configuration makes (its own view, its evaluation's), and the
    settings of each CPT variant it makes (``cpt.*``; ``pipeline.cpt_variants`` give several)."""
    own = variants.view_settings(finetune_spec(cfg).settings_view())
    if cfg.get("evaluate") is not None:
        variants.flatten(plain(cfg.evaluate), "evaluate", own)
    cpts = []
    for variant in plain((cfg.get("pipeline") or {}).get("cpt_variants")) or [None]:
        vcfg = cfg.copy()
        if variant:
            with open_dict(vcfg):
                vcfg.cpt = OmegaConf.merge(vcfg.cpt, variant)
        view = CptSpec.from_config(vcfg).config_view()
        settings = variants.view_settings(view, "cpt", "cpt")
        cpts.append({k: v for k, v in settings.items() if k.split(".")[0] == "cpt"})
    return variants.Configured(str(cfg.task.name), own, cpts)


def report_runs(cfg: DictConfig) -> tuple[str, ...]:
    """The run directories reported: ``runs=[...]`` (names under run.root, or folders), else
    the configured run (a missing one: a one-line error)."""
    out = []
    for name in cfg.get("runs") or [str(cfg.run.name)]:
        path = Path(str(name)).expanduser()
        path = path if path.is_dir() else Path(str(cfg.run.root)).expanduser() / str(name)
        if not path.is_dir():
            raise CmmergeError(
                f"run directory {path} does not exist (run.root={cfg.run.root}, run {name})"
            )
        out.append(str(path))
    return tuple(out)


def _report_variants(cfg: DictConfig) -> dict:
    """Which variants the report shows: all of them (several runs, or
    ``report.all_variants=true``), and the ones the configuration makes first (or only)."""
    shown_all = len(report_runs(cfg)) > 1 or (
        OmegaConf.select(cfg, "report.all_variants") is not None
        and config_bool(cfg, "report.all_variants")
    )
    made = configured(cfg)
    return {"all": shown_all, "finetune": made.own, "cpt": made.cpts}


def _n_resamples(cfg: DictConfig) -> int:
    return int((cfg.get("report") or {}).get("n_resamples", 1000))


@dataclass(frozen=True)
class ReportSpec(RunFolderSpec):
    """``cmmerge report [runs=[...]]``: the study of one or several run directories ->
    ``report/`` of the run."""

    task: str = setting("", "task.name", kind=str, view=False)
    runs: tuple[str, ...] = setting((), report_runs)
    n_resamples: int = setting(1000, _n_resamples)
    shown: FrozenMap | None = setting(source=_report_variants, view="variants")

    STAGE: ClassVar[str] = "report"

    @property
    def all_variants(self) -> bool:
        return bool(self.shown["all"])

    @property
    def made(self) -> variants.Configured:
        """What the configuration makes (:func:`configured`)."""
        chosen = thaw(self.shown)
        return variants.Configured(self.task, chosen["finetune"], chosen["cpt"])


def spec_type(stage: str) -> type[StageSpec] | None:
    """The spec class the stage registry names for ``stage`` (None: it has no folder)."""
    name = STAGES[stage].spec
    return None if name is None else globals()[name]


def spec_for(cfg: DictConfig, stage: str, **options: Any) -> StageSpec:
    """The spec of ``stage`` from the composed config (``finetune`` with ``init=graft``: the
    graft's); ``options``: ``task_name`` for ``evaluate``."""
    if stage == "finetune":
        return finetune_spec(cfg)
    kind = spec_type(stage) if stage in STAGES else None
    if kind is None:
        specs = ", ".join(name for name, s in STAGES.items() if s.spec)
        raise KeyError(f"no spec for stage {stage!r}; specs: {specs}")
    return kind.from_config(cfg, **options)
