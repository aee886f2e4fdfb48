"""Typed specs of the stages: the one place a stage's identity comes from.

A spec is a frozen (hashable) dataclass built once from the composed Hydra config at the stage
boundary (:func:`spec_for`, or ``<Stage>Spec.from_config(cfg)``). It holds every setting that
changes the stage's outputs, typed (ints, floats, tuples, nested specs for the upstream stages,
and :class:`FrozenMap` for the free-form sections: ``task``, ``cpt``, ``finetune``, ``peft``...).
Everything that names or checks a stage is derived from it, so they cannot disagree:

- ``spec.folder_id`` / ``spec.folder``: the stage's folder in the run directory
  (:mod:`cmmerge.stages.ids` delegates its ``cpt_id``, ``merge_id``, ``finetune_id``,
  ``init_id`` and ``stage_dirs`` to the specs). The readable part names what is usually varied
  (``ties-l0.5-d0.2``); every other setting that differs from its preset adds a short hash.
- ``spec.config_view()``: the manifest's ``config``, which
  :func:`cmmerge.io.manifest.fingerprint` hashes (less
  :data:`~cmmerge.io.manifest.NOT_OUTPUT_SETTINGS`) into the stage's fingerprint, and
  ``spec.fingerprint(inputs)``, that hash.
- ``spec.cli_hint()``: the command that makes the stage, named in the errors of its consumers.

A few values are known only once the stage has looked at its inputs (the labels inferred from
a train file, the folder fine-tuning starts from, the files a merge reads, the dtype a device
supports). They are fields too (``None`` until then; :attr:`StageSpec.RESOLVED` names them),
filled in by the stage with :meth:`StageSpec.resolve`; the folder id never reads them.
``config_view()`` is exactly the dict each stage recorded before the specs existed, so the
fingerprints of finished stages do not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf, open_dict

from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import ARM_TASK_LISTS, NOT_OUTPUT_SETTINGS, fingerprint
from cmmerge.merging.methods import get_method, resolve_params
from cmmerge.settings import (
    CONFIG_DIR,
    SAMPLES_DIR,
    config_bool,
    config_int,
    leakage_tasks,
    load_group_config,
    merge_scale,
    plain,
    split_seed,
    task_config,
)
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
    """``{preset: its config}`` of every ``train`` preset (each file read once)."""
    return {
        path.stem: OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        for path in sorted((CONFIG_DIR / "train").glob("*.yaml"))
    }


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
    """``data.root`` as the stages record it (checked by :func:`cmmerge.settings.data_root`
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


# --- the specs ----------------------------------------------------------------------------------

_UNRESOLVED = "<filled in when the stage runs>"


@dataclass(frozen=True)
class StageSpec:
    """What every spec has: where its run directory is. Subclasses name their stage (``STAGE``,
    the folder under the run directory), the fields filled in when the stage runs
    (``RESOLVED``) and the fields that name the folder rather than appear in the view
    (``NOT_IN_VIEW``)."""

    run_root: str
    run_name: str

    STAGE: ClassVar[str] = ""
    RESOLVED: ClassVar[tuple[str, ...]] = ()
    NOT_IN_VIEW: ClassVar[frozenset[str]] = frozenset({"run_root", "run_name"})

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

    def config_view(self) -> dict[str, Any]:
        raise NotImplementedError

    def fingerprint(self, inputs: list[dict]) -> str:
        """The fingerprint of this stage made from ``inputs``."""
        return fingerprint(self.config_view(), inputs)

    def resolve(self, **values: Any) -> StageSpec:
        """A copy with the :attr:`RESOLVED` fields the stage found (frozen)."""
        unknown = set(values) - set(self.RESOLVED)
        if unknown:
            raise TypeError(f"{type(self).__name__} resolves {self.RESOLVED}, not {unknown}")
        return dataclasses.replace(self, **{k: freeze(v) for k, v in values.items()})

    def settings_view(self) -> dict[str, Any]:
        """The config view less the entries the stage fills in when it runs (:attr:`RESOLVED`):
        what a plan can compare with a finished stage's recorded config before running it."""
        unset = {k: _UNRESOLVED for k in self.RESOLVED if getattr(self, k) is None}
        view = self.resolve(**unset).config_view() if unset else self.config_view()
        return {k: v for k, v in view.items() if v != _UNRESOLVED}

    def _resolved(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.{name} is not resolved yet")
        return thaw(value)

    def cli_hint(self, *extra: str) -> str:
        """The command that makes this stage (``extra`` keys appended)."""
        return _hint(self.run_root, self.run_name, self.STAGE, *self.hint_keys(), *extra)

    def hint_keys(self) -> tuple[str, ...]:
        return ()


def _run(cfg: DictConfig) -> dict[str, str]:
    return {"run_root": str(cfg.run.root), "run_name": str(cfg.run.name)}


@dataclass(frozen=True)
class DataSpec(StageSpec):
    """``cmmerge data``: statistics of the task and the corpus -> ``data/``."""

    task: FrozenMap | None = None
    corpus: FrozenMap | None = None
    data: FrozenMap | None = None
    data_root: str = ""
    seed: int = 0
    cpt_seed: Any = 0
    model: FrozenMap | None = None
    leakage_tasks: tuple[str, ...] = ()

    STAGE: ClassVar[str] = "data"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> DataSpec:
        return cls(
            **_run(cfg),
            task=_section(cfg, "task"),
            corpus=_section(cfg, "corpus"),
            data=_section(cfg, "data"),
            data_root=_data_root(cfg),
            seed=int(cfg.seed),
            cpt_seed=cfg.cpt.seed,
            model=_section(cfg, "model") if cfg.data.get("token_lengths", True) else None,
            leakage_tasks=tuple(leakage_tasks(cfg)),
        )

    @property
    def folder(self) -> Path:
        return self.run_dir / "data"

    @property
    def folder_id(self) -> str:
        return "data"

    def config_view(self) -> dict[str, Any]:
        return {
            "task": thaw(self.task),
            "corpus": thaw(self.corpus),
            "data": thaw(self.data),
            "data_root": self.data_root,
            "seed": self.seed,
            "cpt_seed": self.cpt_seed,
            "model": thaw(self.model),
            "leakage_tasks": list(self.leakage_tasks),
        }


@dataclass(frozen=True)
class CptSpec(StageSpec):
    """``cmmerge cpt``: continued pre-training -> ``cpt/<corpus>[-lora][-<hash>]/``.

    The texts the leakage guard leaves are an input of the stage (their hash), not the list of
    tasks guarded: another task's pipeline that excludes no further text shares the CPT."""

    model: FrozenMap | None = None
    corpus: FrozenMap | None = None
    cpt: FrozenMap | None = None
    peft: FrozenMap | None = None
    data_root: str = ""
    split_seed: int = 0

    STAGE: ClassVar[str] = "cpt"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> CptSpec:
        return cls(
            **_run(cfg),
            model=_section(cfg, "model"),
            corpus=_section(cfg, "corpus"),
            cpt=_section(cfg, "cpt"),
            peft=cpt_peft_section(cfg),
            data_root=_data_root(cfg),
            split_seed=split_seed(cfg),
        )

    @property
    def seed(self) -> int:
        return int(self.cpt["seed"])

    @property
    def folder_id(self) -> str:
        """``<corpus>[-lora][-<hash>]``: the corpus, LoRA, and a hash of every other CPT setting
        that differs from its ``train`` preset (duration, learning rate, seed...)."""
        diff = {**differences(self.cpt, "cpt"), **_peft_differences(self.peft)}
        lora = "" if _peft_name(self.peft) == "none" else f"-{_peft_name(self.peft)}"
        return f"{self.corpus['name']}{lora}{_suffix(diff)}"

    def config_view(self) -> dict[str, Any]:
        return {
            "model": thaw(self.model),
            "corpus": thaw(self.corpus),
            "cpt": thaw(self.cpt),
            "data_root": self.data_root,
            "split_seed": self.split_seed,
            "seed": self.seed,
            "peft": thaw(self.peft),
        }


@dataclass(frozen=True)
class ExtractSpec(StageSpec):
    """``cmmerge extract``: tau = theta_cpt - theta_base -> ``extract/<cpt-id>/``."""

    cpt: CptSpec | None = None
    model: FrozenMap | None = None
    dtype: str | None = None
    compare_with: tuple[str, ...] = ()

    STAGE: ClassVar[str] = "extract"
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {"cpt"}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ExtractSpec:
        return cls(
            **_run(cfg),
            cpt=CptSpec.from_config(cfg),
            model=_section(cfg, "model"),
            dtype=cfg.get("dtype"),
            compare_with=tuple(str(Path(p).expanduser()) for p in cfg.get("task_vectors") or []),
        )

    @property
    def folder_id(self) -> str:
        return self.cpt.folder_id

    def config_view(self) -> dict[str, Any]:
        return {
            "model": thaw(self.model),
            "dtype": self.dtype,
            "compare_with": list(self.compare_with),
        }


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


@dataclass(frozen=True)
class MergeSpec(StageSpec):
    """``cmmerge merge``: theta_base + lambda * combine(tau...) ->
    ``merge/<method>-l<lambda>[-d<density>][-src_<sources>[_s<seed>]][-w<weights>][-<hash>]@<cpt-id>``.

    ``seed`` is set only when a source is a task (tau of a seeded fine-tune);
    ``source_finetunes`` are those fine-tunes' ids without their seed (their training
    settings); ``weights`` those of a run-directory merge (a standalone merge's are recorded
    with its sources). ``source_paths`` and ``source_weights`` are resolved by the stage."""

    method: str = "task_arithmetic"
    scale: float = 1.0
    params: FrozenMap | None = None
    sources: tuple[str, ...] = ("cpt",)
    weights: tuple[float, ...] | None = None
    dtype: str | None = None
    max_shard_size: Any = None
    allow_nonfinite: bool = False
    seed: int | None = None
    cpt: CptSpec | None = None
    source_finetunes: tuple[str, ...] = ()
    source_paths: tuple[str, ...] | None = None
    source_weights: tuple[float, ...] | None = None

    STAGE: ClassVar[str] = "merge"
    RESOLVED: ClassVar[tuple[str, ...]] = ("source_paths", "source_weights")
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {
        "sources",
        "weights",
        "seed",
        "cpt",
        "source_finetunes",
    }

    @classmethod
    def from_config(cls, cfg: DictConfig) -> MergeSpec:
        method = method_name(cfg)
        m = cfg.method
        params = resolve_params(
            method,
            density=cfg.get("density"),
            sign=m.get("sign"),
            normalize=m.get("normalize"),
            trim_scope=m.get("trim_scope"),
            seed=m.get("seed"),
        )
        sources = source_names(cfg)
        tasks = [s for s in sources if s != "cpt"]
        # a standalone merge (models= / task_vectors=) records its weights with its sources
        standalone = bool(cfg.get("models") or cfg.get("task_vectors"))
        weights = None if cfg.get("weights") is None or standalone else cfg.weights
        return cls(
            **_run(cfg),
            method=method,
            scale=merge_scale(cfg),
            params=freeze(params),
            sources=tuple(sources),
            weights=None if weights is None else tuple(float(w) for w in weights),
            dtype=None if cfg.get("dtype") is None else str(cfg.dtype),
            max_shard_size=cfg.get("max_shard_size"),
            allow_nonfinite=bool(cfg.get("allow_nonfinite")),
            seed=int(cfg.seed) if tasks else None,
            cpt=CptSpec.from_config(cfg),
            source_finetunes=tuple(
                _SEED_SUFFIX.sub("", source_finetune_spec(cfg, t).folder_id) for t in tasks
            ),
        )

    @property
    def tasks(self) -> list[str]:
        """The sources that are tasks (tau of the base fine-tuned on them)."""
        return [s for s in self.sources if s != "cpt"]

    @property
    def shard_bytes(self) -> int:
        """``max_shard_size`` in bytes (a bad value: one-line error)."""
        from cmmerge.io.checkpoint import DEFAULT_MAX_SHARD_SIZE

        return shard_bytes(self.max_shard_size or DEFAULT_MAX_SHARD_SIZE)

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

    def config_view(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "lambda": self.scale,
            "weights": self._resolved("source_weights"),
            "params": thaw(self.params),
            "dtype": self.dtype or "float32",  # what is written
            "max_shard_size": self.shard_bytes,
            "allow_nonfinite": self.allow_nonfinite,
            "sources": self._resolved("source_paths"),
        }

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

    init: str = "base"
    start: StageSpec | str = "base"  # the CPT or merge spec fine-tuning starts from
    task: FrozenMap | None = None
    finetune: FrozenMap | None = None
    peft: FrozenMap | None = None
    seed: int = 0
    data_root: str = ""
    split_seed: int = 0
    init_dir: str | None = None
    labels: tuple[str, ...] | None = None

    STAGE: ClassVar[str] = "finetune"
    RESOLVED: ClassVar[tuple[str, ...]] = ("init_dir", "labels")
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {"start"}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> FinetuneSpec:
        return cls(
            **_run(cfg),
            init=str(cfg.init),
            start=init_spec(cfg),
            task=_section(cfg, "task"),
            finetune=_section(cfg, "finetune"),
            peft=_section(cfg, "peft"),
            seed=int(cfg.seed),
            data_root=_data_root(cfg),
            split_seed=split_seed(cfg),
        )

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

    def config_view(self) -> dict[str, Any]:
        return {
            "task": thaw(self.task),
            "finetune": thaw(self.finetune),
            "init": self.init,
            "init_dir": self._resolved("init_dir"),
            "data_root": self.data_root,
            "split_seed": self.split_seed,
            "seed": self.seed,
            "peft": thaw(self.peft),
            "labels": self._resolved("labels"),
            "labels_inferred": self.labels_inferred,
        }

    def hint_keys(self) -> tuple[str, ...]:
        return (f"init={self.init}", f"task={self.task_name}", f"seed={self.seed}")


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


@dataclass(frozen=True)
class GraftSpec(StageSpec):
    """``cmmerge graft``: tau_cpt added to the base fine-tuned on ``onto`` ->
    ``finetune/<merge-id>+<onto fine-tune id without its seed>-<task>-s<seed>/``. It starts
    with the merge's ``<method>-l<lambda>`` so the report groups its lambdas into one family,
    and its source's id carries the training settings. ``labels`` is resolved by the stage."""

    onto: str = ""
    merge: MergeSpec | None = None
    onto_finetune: str = ""  # the id of the fine-tune on onto (with its seed)
    task: FrozenMap | None = None
    evaluate: FrozenMap | None = None
    data_root: str = ""
    split_seed: int = 0
    seed: int = 0
    labels: tuple[str, ...] | None = None

    STAGE: ClassVar[str] = "finetune"
    RESOLVED: ClassVar[tuple[str, ...]] = ("labels",)
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {"merge", "onto_finetune"}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> GraftSpec:
        onto = onto_task(cfg)
        return cls(
            **_run(cfg),
            onto=onto,
            merge=MergeSpec.from_config(cfg),
            onto_finetune=source_finetune_spec(cfg, onto).folder_id,
            task=_section(cfg, "task"),
            evaluate=_section(cfg, "evaluate"),
            data_root=_data_root(cfg),
            split_seed=split_seed(cfg),
            seed=int(cfg.seed),
        )

    init: ClassVar[str] = GRAFT

    @property
    def task_name(self) -> str:
        return str(self.task["name"])

    @property
    def init_id(self) -> str:
        return f"{self.merge.folder_id}+{_SEED_SUFFIX.sub('', self.onto_finetune)}"

    @property
    def folder_id(self) -> str:
        return f"{self.init_id}-{self.task_name}-s{self.seed}"

    def config_view(self) -> dict[str, Any]:
        return {
            "onto": self.onto,
            "method": self.merge.method,
            "lambda": self.merge.scale,
            "params": thaw(self.merge.params),
            "dtype": self.merge.dtype or "float32",
            "task": thaw(self.task),
            "labels": self._resolved("labels"),
            "evaluate": thaw(self.evaluate),
            "data_root": self.data_root,
            "split_seed": self.split_seed,
            "seed": self.seed,
        }

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

    model: FinetuneSpec | GraftSpec | None = None
    task: FrozenMap | None = None  # the evaluation task's config
    evaluate: FrozenMap | None = None
    data_root: str = ""
    split_seed: int = 0
    seed: int = 0
    labels: tuple[str, ...] | None = None

    STAGE: ClassVar[str] = "evaluate"
    RESOLVED: ClassVar[tuple[str, ...]] = ("labels",)
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {"model"}

    @classmethod
    def from_config(cls, cfg: DictConfig, task_name: str | None = None) -> EvaluateSpec:
        name = task_name or str(cfg.task.name)
        return cls(
            **_run(cfg),
            model=finetune_spec(cfg),
            task=freeze(task_config(cfg, name)),
            evaluate=_section(cfg, "evaluate"),
            data_root=_data_root(cfg),
            split_seed=split_seed(cfg),
            seed=int(cfg.seed),
        )

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

    def config_view(self) -> dict[str, Any]:
        return {
            "task": thaw(self.task),
            "labels": self._resolved("labels"),
            "evaluate": thaw(self.evaluate),
            "data_root": self.data_root,
            "split_seed": self.split_seed,
            "seed": self.seed,
        }

    def hint_keys(self) -> tuple[str, ...]:
        return (f"init={self.model.init}", f"task={self.model.task_name}", f"seed={self.seed}")


@cache
def _prompt_defaults() -> dict:
    return dict(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "prompt.yaml").prompt))


@dataclass(frozen=True)
class PromptSpec(StageSpec):
    """``cmmerge prompt`` ->
    ``prompt/<model>-<init>-<task>-k<shots>-s<seed>[-norm][-<hash>]/``; the hash covers a
    template, verbalisers or max_length other than the defaults. ``dtype`` (what the device
    runs) is resolved by the stage."""

    model_name: str = ""
    start: StageSpec | str = "base"
    task: FrozenMap | None = None
    prompt: FrozenMap | None = None
    normalize: bool = False
    shots: int = 0
    seed: int = 0
    data_root: str = ""
    split_seed: int = 0
    dtype: str | None = None

    STAGE: ClassVar[str] = "prompt"
    RESOLVED: ClassVar[tuple[str, ...]] = ("dtype",)
    NOT_IN_VIEW: ClassVar[frozenset[str]] = StageSpec.NOT_IN_VIEW | {"model_name", "start"}

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PromptSpec:
        model = cfg.model.get("name_or_path") or cfg.model.name
        init_cfg = cfg.copy()
        with open_dict(init_cfg):
            init_cfg.init = cfg.prompt.init
        return cls(
            **_run(cfg),
            model_name=re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model)).name or "model"),
            start=init_spec(init_cfg),
            task=_section(cfg, "task"),
            prompt=_section(cfg, "prompt"),
            normalize=config_bool(cfg, "prompt.normalize"),
            shots=config_int(cfg, "shots"),
            seed=config_int(cfg, "seed"),
            data_root=_data_root(cfg),
            split_seed=split_seed(cfg),
        )

    @property
    def folder_id(self) -> str:
        shape = {k: thaw(self.prompt.get(k)) for k in ("template", "verbalizers", "max_length")}
        diff = {k: v for k, v in shape.items() if _prompt_defaults().get(k) != v}
        return (
            f"{self.model_name}-{init_name(self.start)}-{self.task['name']}-k{self.shots}"
            f"-s{self.seed}{'-norm' if self.normalize else ''}"
            + (f"-{short_hash(diff)}" if diff else "")
        )

    def config_view(self) -> dict[str, Any]:
        return {
            "task": thaw(self.task),
            "prompt": thaw(self.prompt),
            "normalize": self.normalize,
            "dtype": self._resolved("dtype"),
            "shots": self.shots,
            "seed": self.seed,
            "data_root": self.data_root,
            "split_seed": self.split_seed,
        }

    def hint_keys(self) -> tuple[str, ...]:
        return (f"task={self.task['name']}", f"shots={self.shots}", f"seed={self.seed}")


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
