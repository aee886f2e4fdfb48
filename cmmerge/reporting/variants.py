"""Variants of an arm: the settings each fine-tune was made with, read from the config views
its stage and every stage upstream of it recorded in their manifests (``spec.config_view()`` of
:mod:`cmmerge.config.specs`, less what :func:`~cmmerge.io.manifest.output_view` leaves out of the
fingerprints), so no list of settings is kept by hand.

A fine-tune's settings are flat ``{dotted key: JSON value}``: its own view (``finetune.epochs``,
``peft.name``, ``task.train``, ``labels``), its evaluation's (``evaluate.max_length``), the base
model it descends from (``model``) and, per upstream stage, that stage's view under the stage's
name (``cpt.max_steps``, ``cpt.corpus.name``, ``merge.method``, ``merge.lambda``) with the CPT's
folder id as ``cpt`` (it also names the corpus the leakage guard left). Two fine-tunes are
*like for like* when every setting both have is the same: what only one has (the CPT and merge
an arm starts from) is the arm itself. Two arms of one name that differ are *variants*, labelled
with the settings they differ in (``Full FT [epochs=2]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmmerge.io.manifest import ARM_TASK_LISTS, output_view, read_manifest

if TYPE_CHECKING:
    from cmmerge.reporting.study import Arm

# Recorded view entries that are no setting of the result: where files are (the upstream stages
# are followed through their manifests instead), how merged weights are sharded, and the seed of
# the fine-tune (the unit comparisons pair on; a CPT's seed is ``cpt.seed``).
_NOT_SETTINGS = frozenset(
    {"seed", "init", "init_dir", "data_root", "sources", "compare_with", "max_shard_size",
     "labels_inferred"}
)  # fmt: skip
# Settings a training section records that the arm's own name carries (``Sequential FT (x
# first)``): the folder id names them too.
_NAMED_BY_ARM = ARM_TASK_LISTS
# Chosen per merge family on validation (the row shows the choice), never a variant.
_SELECTED = frozenset({"lambda", "density"})
# An upstream fine-tune (the task a multi-source merge or a graft takes tau from).
_PREFIX = {"finetune": "source", "graft": "source"}


def dump(value: Any) -> str:
    """A setting's value as compared and shown (JSON, strings bare)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def flatten(value: Any, key: str, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if k not in _NAMED_BY_ARM:
                flatten(v, f"{key}.{k}" if key else str(k), out)
    else:
        out[key] = dump(value)


def view_settings(view: dict, prefix: str = "", stage: str = "") -> dict[str, str]:
    """The flat settings of one recorded config view; the stage's own section (``cpt`` of a CPT)
    is flattened straight under ``prefix``."""
    out: dict[str, str] = {}
    for key, value in output_view(dict(view or {})).items():
        if key in _NOT_SETTINGS:
            continue
        name = prefix if prefix and key == stage else f"{prefix}.{key}" if prefix else key
        flatten(value, name, out)
    return out


def _upstream(manifest: dict, out: dict[str, str], cache: dict) -> str | None:
    """Adds the settings of the stages ``manifest`` was made from (depth first) and returns the
    folder name of the base model they descend from (the first file input of the chain)."""
    model = None
    for item in manifest.get("inputs") or []:
        if not isinstance(item, dict) or "path" not in item:
            continue
        path = Path(str(item["path"]))
        if "manifest_sha256" not in item:
            model = model or path.name
            continue
        if path not in cache:
            cache[path] = read_manifest(path) or {}
        upstream = cache[path]
        stage = str(upstream.get("stage", ""))
        if not stage:
            continue
        prefix = _PREFIX.get(stage, stage)
        for key, value in view_settings(upstream.get("config") or {}, prefix, stage).items():
            out.setdefault(key, value)
        if stage == "cpt":
            out.setdefault("cpt", path.name)
        found = _upstream(upstream, out, cache)
        model = model or found
    return model


def finetune_settings(manifest: dict, evaluation: dict | None, cache: dict) -> dict[str, str]:
    """The settings a finished fine-tune (or graft) was made with and evaluated under."""
    out = view_settings(manifest.get("config") or {})
    if evaluation:
        section = (evaluation.get("config") or {}).get("evaluate")
        if isinstance(section, dict):
            flatten(section, "evaluate", out)
    model = _upstream(manifest, out, cache)
    if model:
        out.setdefault("model", model)
    return out


def like_for_like(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The settings both have with different values ([] when the two are like for like)."""
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


_LAMBDA = re.compile(r" \((?:([^()]*), )?lambda=[^()]*\)")


def strip_lambda(name: str) -> str:
    """An arm's name without ``lambda=...`` (``TV->FT (lambda=0.5) [x]`` -> ``TV->FT [x]``)."""
    return _LAMBDA.sub(lambda m: f" ({m.group(1)})" if m.group(1) else "", name)


def base_name(kind: str) -> str:
    """An arm's name without its lambda, tags, LoRA and labels (``TV->FT (lambda=0.5)`` ->
    ``TV->FT``): what differs there is a variant. The sources of a multi-source merge name
    another arm: ``TIES->FT (cpt+english-sentiment-en-hi, lambda=1)`` ->
    ``TIES->FT (cpt+english-sentiment-en-hi)``."""
    name = strip_lambda(re.split(r" \[", kind)[0]).replace(" (LoRA)", "")
    head, _, rest = name.partition(" (")
    sources = rest.rstrip(")").split(", ")[0]
    if head.endswith("->FT") and sources and not sources.endswith(" labels"):
        return f"{head} ({sources})"
    return head


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def differing(settings: Iterable[dict[str, str]], shared_only: bool = False) -> set[str]:
    """Keys whose value differs between some of ``settings`` (``shared_only``: among keys every
    one has), less the lambda and density a merge family chooses on validation."""
    settings = list(settings)
    if len(settings) < 2:
        return set()
    keys = set().union(*settings)
    if shared_only:
        keys = set.intersection(*(set(s) for s in settings))
    out = set()
    for key in keys:
        if _leaf(key) in _SELECTED:
            continue
        if len({s.get(key) for s in settings}) > 1:
            out.add(key)
    return out


def _short(key: str, keys: list[str]) -> str:
    """The shortest dotted tail of ``key`` no other of ``keys`` ends with (``epochs``;
    ``peft.name`` rather than a bare ``name``)."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if n == 1 and tail == "name" and len(parts) > 1:
            continue
        if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
            return tail
    return key


def tag(settings: dict[str, str], keys: set[str]) -> str:
    """``cpt en-hi-3f2a1b, max_steps=300, epochs=2``: the CPT first, then each key by its
    shortest unambiguous tail, in key order (the CPT's settings before the fine-tune's)."""
    present = sorted(k for k in keys if k in settings and k != "cpt")
    parts = [f"cpt {settings['cpt']}"] if "cpt" in keys and "cpt" in settings else []
    parts += [f"{_short(key, present)}={settings[key]}" for key in present]
    return ", ".join(parts)


@dataclass(frozen=True)
class Configured:
    """What a configuration makes, as the report compares it with finished fine-tunes.

    Attributes:
        task: The configured task.
        own: The settings of the fine-tune it makes (its view and its evaluation's, flat).
        cpts: The settings of each CPT variant it makes (``cpt.*``).
    """

    task: str
    own: dict[str, str] = field(default_factory=dict)
    cpts: list[dict[str, str]] = field(default_factory=list)


def matches(settings: dict[str, str], keys: set[str], task: str, made: Configured) -> bool:
    """Whether a fine-tune of ``task`` with ``settings`` is the configuration's variant on the
    ``keys`` its variants differ in (keys the configuration does not set are not checked)."""
    same_task = task == made.task
    for key in keys:
        if key in made.own and (same_task or not key.startswith("task.")):
            if settings.get(key) != made.own[key]:
                return False
    cpt_keys = [k for k in keys if any(k in c for c in made.cpts)]
    return not cpt_keys or any(
        all(settings.get(k) == c.get(k) for k in cpt_keys) for c in made.cpts
    )


# --- arms --------------------------------------------------------------------------------------


def _label_keys(arms: list[Arm]) -> dict[tuple[str, str], set[str]]:
    """``{(run, group): keys}``: the settings an arm is labelled with: those in which it differs
    from other arms of its name on its task, and the settings every arm of the task has that do
    not agree across the task (so rows compared like for like can be told apart)."""
    out = {}
    for task in {a.task for a in arms}:
        mine = [a for a in arms if a.task == task]
        across = differing([a.settings for a in mine], shared_only=True)
        for name in {base_name(a.kind) for a in mine}:
            same = [a for a in mine if base_name(a.kind) == name]
            keys = differing([a.settings for a in same]) | across
            for arm in same:
                out[(arm.run, arm.group)] = keys
    return out


def tag_variants(arms: list[Arm]) -> None:
    """Sets each arm's ``tag`` and names it with it (``CPT->FT [cpt en-hi-3f2a1b, epochs=2]``)."""
    for (run, group), keys in _label_keys(arms).items():
        arm = next(a for a in arms if (a.run, a.group) == (run, group))
        arm.tag = tag(arm.settings, keys)
        arm.arm = f"{arm.kind} [{arm.tag}]" if arm.tag else arm.kind
        for member in arm.members:
            member.arm = arm.arm


def mark_configured(arms: list[Arm], made: Configured, hide: bool) -> None:
    """Marks the arms made with the configured settings ``made`` (on the settings their
    variants differ in); with ``hide``, an arm whose configured variant the study holds shows
    only that one."""
    keys = _label_keys(arms)
    for arm in arms:
        arm.configured = matches(arm.settings, keys[(arm.run, arm.group)], arm.task, made)
    if not hide:
        return
    for arm in arms:
        name = base_name(arm.kind)
        siblings = [a for a in arms if a.task == arm.task and base_name(a.kind) == name]
        arm.shown = arm.configured or not any(a.configured for a in siblings)
