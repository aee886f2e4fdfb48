"""The top-level keys, each declared once: default, type, allowed values, what it does and
which commands have it (every command, or e.g. only ``prompt``).

:data:`KEYS` is the one place such a key is written. :func:`register` puts their defaults in
Hydra's ConfigStore: ``keys`` (those every command has), which ``configs/common.yaml`` lists
where its own values would be, and ``keys_<command>`` (a command's own), which that command's
YAML lists likewise, so groups and experiments override them as before. A stage spec that reads
a key (``setting(source="seed")``) takes its type and allowed values from here, and the override
check (:mod:`cmmerge.config.overrides`) refuses a value of the wrong type with them. The training
sections' keys (``cpt.*``, ``finetune.*``, ``evaluate.*``) are declared in
:mod:`cmmerge.config.sections`; the keys of a group (``model.*``, ``task.*``...) stay in their
YAML files, where they are written once too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cmmerge.io.model_files import WRITE_DTYPES


def range_problem(value: Any, choices: tuple[str, ...] | None, low: float | None) -> str | None:
    """What is wrong with ``value`` for allowed ``choices`` and lowest number ``low`` (``choose
    one of ...``, ``must be >= ...``), or None: the one wording of keys and stage specs."""
    if choices is not None and str(value) not in choices:
        return f"choose one of {', '.join(choices)}"
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if low is not None and number and value < low:
        return f"must be >= {low:g}"
    return None


NODE = "keys"  # its name in the ConfigStore and in common.yaml's defaults list


@dataclass(frozen=True)
class Key:
    """One top-level key: its dotted name, default, what it does (``doc``, shown by
    ``cmmerge --help``), what it accepts: ``kind`` (int, float, bool or str; None: anything,
    e.g. a list or null), ``choices`` (for a str) and ``low`` (the smallest number), and the
    ``commands`` that have it (none named: every command)."""

    name: str
    default: Any
    doc: str
    kind: type | None = None
    choices: tuple[str, ...] | None = None
    low: float | None = None
    commands: tuple[str, ...] = ()  # the commands that have it; () = every command

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this key (``seed takes a whole number, e.g.
        seed=0``, ``choose one of ...``), or None when it fits: null and interpolations
        (``${...}``) always do, and a key of no declared ``kind`` takes anything."""
        if value is None or self.kind is None or (isinstance(value, str) and "${" in value):
            return None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        expected = {
            bool: ("true or false", "true", isinstance(value, bool)),
            int: ("a whole number", self._example(), number and isinstance(value, int)),
            float: ("a number", "0.5", number),
        }.get(self.kind)
        if expected is not None and not expected[2]:
            return f"{self.name} takes {expected[0]}, e.g. {self.name}={expected[1]}"
        return range_problem(value, self.choices, self.low)

    def _example(self) -> str:
        default = self.default
        whole = isinstance(default, int) and not isinstance(default, bool) and default >= 0
        return str(default) if whole else "1"


_LEAKAGE = [
    "sentiment-en-hi",
    "sentiment-en-es",
    "hate-en-hi",
    "sentiment-en-ta",
    "sentiment-en-ml",
    "lid-en-hi",
    "lid-en-es",
    "lid-en-hi-l3cube",
]

KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("run.root", "runs", "run directories live in ${run.root}/${run.name}", str),
        Key("run.name", "default", "the run directory's name under run.root", str),
        Key("seed", 0, "fine-tuning / evaluation seed (CPT has its own: cpt.seed)", int),
        Key("force", False, "true: redo finished stages", bool),
        Key("debug", False, "true: full tracebacks on errors", bool),
        Key(
            "data.root",
            None,
            "a folder laid out like shared/data; null = the samples shipped with cmmerge",
            str,
        ),
        Key(
            "data.split_seed",
            0,
            "seed of validation splits carved from train (fixed across seeds)",
            int,
        ),
        Key(
            "data.leakage_tasks",
            _LEAKAGE,
            "validation and test texts of these tasks (and of task and eval_tasks) are removed "
            "from every CPT corpus; a task whose files are missing under data.root is skipped "
            "and reported",
        ),
        Key(
            "data.token_lengths",
            True,
            "cmmerge data: token length percentiles with the model's tokenizer",
            bool,
        ),
        Key("cache_dir", None, "built tiny models; null = $CMMERGE_CACHE or ~/.cache/cmmerge", str),
        Key(
            "cpt_peft",
            None,
            "CPT's own peft: none | lora | {name: lora, r: 16}; null = the peft group's "
            "(cpt_peft=none peft=lora: full CPT, then LoRA fine-tuning)",
        ),
        Key("lambda", 1.0, "merge: the scale of the combined task vectors", float),
        Key("density", 0.2, "merge: fraction of each task vector kept by ties (0, 1]", float),
        Key("base", None, "standalone merge: base model folder", str),
        Key("models", None, "standalone merge: fine-tuned model folders"),
        Key("task_vectors", None, "standalone merge: task-vector .safetensors files"),
        Key("weights", None, "per-source weights (default: 1 each)"),
        Key(
            "sources",
            None,
            "run-dir merge sources: [cpt] (default) and/or task names, e.g. "
            "[cpt, english-sentiment-en-hi] = tau_cpt + tau of base fine-tuned on it",
        ),
        Key("output", None, "standalone merge: the output model folder", str),
        Key(
            "dtype",
            None,
            "merged weights' dtype: float32 by default (float16, bfloat16 on request)",
            str,
            WRITE_DTYPES,
        ),
        Key(
            "max_shard_size",
            "2GB",
            "merged weights are written in shards of at most this (bytes, or 500MB/2GB)",
        ),
        Key(
            "allow_nonfinite",
            False,
            "true: merge sources holding NaN/Inf instead of stopping",
            bool,
        ),
        Key(
            "allow_pickle",
            False,
            "true: read pickle .bin checkpoints (unpickling can run code)",
            bool,
        ),
        Key(
            "grow_vocab",
            False,
            "true: merge a source with more vocabulary rows than the base (its extra rows and "
            "tokenizer are used; said in the closing line/manifest)",
            bool,
        ),
        Key(
            "init",
            "merged",
            "fine-tune / evaluate from: base | cpt | merged | a model folder | graft (made by "
            "cmmerge graft)",
            str,
        ),
        Key(
            "onto",
            "english-sentiment-en-hi",
            "init=graft: tau_cpt is added to the base fine-tuned on this task",
            str,
        ),
        Key(
            "eval_tasks",
            None,
            "tasks to evaluate on (default: [task.name]); same label set",
        ),
        Key(
            "shots",
            0,
            "demonstrations drawn from train (with the seed) before each prompt",
            int,
            low=0,
            commands=("prompt",),
        ),
        Key(
            "runs",
            None,
            "run directories to report together (names under run.root, or folders)",
            commands=("report",),
        ),
        Key(
            "keep_merged",
            False,
            "false: a merged checkpoint is deleted once every fine-tune made from it here is "
            "finished (its manifest stays; pruned.json lists what went)",
            bool,
            commands=("pipeline", "sweep"),
        ),
        Key(
            "keep_models",
            True,
            "false: fine-tuned weights are deleted once evaluated (metrics and predictions "
            "stay); a later stage that needs them has them made again",
            bool,
            commands=("pipeline", "sweep"),
        ),
    )
}
COMMANDS_WITH_KEYS = sorted({c for k in KEYS.values() for c in k.commands})


def node_name(command: str | None = None) -> str:
    """The ConfigStore name of the shared keys (``keys``) or of a command's own (``keys_<it>``)."""
    return NODE if command is None else f"{NODE}_{command}"


def _of(command: str | None) -> list[Key]:
    return [k for k in KEYS.values() if (command in k.commands if command else not k.commands)]


def defaults(command: str | None = None) -> dict[str, Any]:
    """The defaults of the shared keys, or of ``command``'s own keys, as a nested mapping
    (``run.root`` under ``run``), in declared order."""
    node: dict[str, Any] = {}
    for key in _of(command):
        *parents, leaf = key.name.split(".")
        inner = node
        for part in parents:
            inner = inner.setdefault(part, {})
        inner[leaf] = list(key.default) if isinstance(key.default, list) else key.default
    return node


def help_text(command: str | None = None) -> str:
    """One line per key that ``command`` has, ``name = default: doc``, for its ``--help``."""
    lines = []
    for key in _of(None) + (_of(command) if command else []):
        default = "null" if key.default is None else key.default
        if isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, list):
            default = f"[{','.join(default)}]"
        lines.append(f"  {key.name} = {default}: {key.doc}")
    return "\n".join(lines).replace("$", "$$")  # the help is a string.Template: $ escaped


def register() -> None:
    """Store the shared keys' defaults in Hydra's ConfigStore as ``keys`` and each command's own
    as ``keys_<command>`` (again: the same nodes), and the ``cmmerge_keys_help`` resolver that
    the help's footer shows them with."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name=node_name(), node=defaults())
    for command in COMMANDS_WITH_KEYS:
        store.store(name=node_name(command), node=defaults(command))
    OmegaConf.register_new_resolver("cmmerge_keys_help", help_text, replace=True)
