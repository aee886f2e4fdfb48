"""Names of stage folders in a run directory (DESIGN section 3) and of the paper's arms.

Each folder name is its stage's spec's (:mod:`cmmerge.config.specs`, the one source of the
folder ids, fingerprinted views and CLI hints): :func:`stage_dirs` gathers them. The readable
part names what is usually varied (``ties-l0.5-d0.2``, ``cpt@en-hi-sentiment-en-hi-s0``); every
other setting that differs from its preset (the method's file, the ``train`` group's presets)
adds a short hash of the differences, so two variants never share a folder. Stages made from a
CPT carry its id after ``@``: several CPT variants (corpus, duration) live in one run directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.config.specs import (
    GRAFT,
    CptSpec,
    GraftSpec,
    MergeSpec,
    finetune_spec,
    method_name,
    num,
    onto_task,
    source_names,
)
from cmmerge.config.values import merge_scale


def is_graft_id(name: str) -> bool:
    """Whether a ``finetune/`` folder name is a graft's: its CPT id (after ``@``, which never
    holds ``+``) is followed by ``+``, where a fine-tune's is followed by ``-<task>``."""
    return re.search(r"@[^@+]*\+", name) is not None


def _task_list(cfg: DictConfig, key: str) -> list[str]:
    return [str(t) for t in (cfg.finetune.get(key) or [])]


def is_monolingual(task: DictConfig | dict) -> bool:
    """A task in one language (``language_pair: en``), e.g. English labels for a code-mixed
    task: its arms are named apart from those trained on code-mixed labels."""
    pair = str(task.get("language_pair") or "")
    return bool(pair) and "-" not in pair


def _language_name(task: DictConfig | dict) -> str:
    pair = str(task.get("language_pair") or "")
    return {"en": "English", "hi": "Hindi", "es": "Spanish"}.get(pair, pair)


def graft_arm(cfg: DictConfig) -> str:
    """``English FT + τ_cpt (lambda=0.5)`` (``(TIES, lambda=..)`` for other methods)."""
    from cmmerge.presets import load_group_config

    onto = onto_task(cfg)
    task = cfg.task if str(cfg.task.name) == onto else load_group_config("task", onto)
    source = f"{_language_name(task)} FT" if is_monolingual(task) else f"FT on {onto}"
    method = method_name(cfg)
    short = "" if method == "task_arithmetic" else f"{_SHORT.get(method, method)}, "
    return f"{source} + τ_cpt ({short}lambda={num(merge_scale(cfg))})"


_SHORT = {"task_arithmetic": "TV", "ties": "TIES"}


def arm_name(cfg: DictConfig) -> str:
    """The paper's name of the arm this fine-tuning run belongs to; arms trained on a
    monolingual task (English labels) say so: ``Full FT (English labels)``."""
    lora = " (LoRA)" if str(cfg.get("peft", {}).get("name", "none")) == "lora" else ""
    if str(cfg.init) == GRAFT:
        return graft_arm(cfg) + lora
    if _task_list(cfg, "sequential"):
        return f"Sequential FT ({' -> '.join(_task_list(cfg, 'sequential'))} first){lora}"
    if _task_list(cfg, "joint"):
        return f"Joint FT (+{'+'.join(_task_list(cfg, 'joint'))}){lora}"
    return _init_arm(cfg) + lora


def _init_arm(cfg: DictConfig) -> str:
    init = str(cfg.init)
    labels = f"{_language_name(cfg.task)} labels" if is_monolingual(cfg.task) else ""
    if init == "merged":
        short = _SHORT.get(method_name(cfg), method_name(cfg))
        sources = "" if source_names(cfg) == ["cpt"] else f"{'+'.join(source_names(cfg))}, "
        labels = f"{labels}, " if labels else ""
        return f"{short}->FT ({sources}{labels}lambda={num(merge_scale(cfg))})"
    name = {"base": "Full FT", "cpt": "CPT->FT"}.get(init, f"FT from {init}")
    return f"{name} ({labels})" if labels else name


def stage_dirs(cfg: DictConfig) -> dict[str, Path]:
    """The folders of a run's stages for ``cfg``, each from its stage's spec."""
    cpt = CptSpec.from_config(cfg)
    model = finetune_spec(cfg)
    root = cpt.run_dir
    graft = {}
    if isinstance(model, GraftSpec):  # the fine-tune a graft adds tau_cpt to
        graft["onto"] = root / "finetune" / model.onto_finetune
    return {
        **graft,
        "run": root,
        "data": root / "data",
        "cpt": cpt.folder,
        "extract": root / "extract" / cpt.folder_id,
        "merge": root
        / "merge"
        / (model.merge if isinstance(model, GraftSpec) else MergeSpec.from_config(cfg)).folder_id,
        "finetune": model.folder,
        "evaluate": root / "evaluate" / model.folder_id,
        "sweep": root / "sweep",
        "report": root / "report",
    }


def cli_hint(cfg: DictConfig, stage: str, *extra: str) -> str:
    """The command that makes a missing upstream stage."""
    parts = ["cmmerge", stage, f"run.root={cfg.run.root}", f"run.name={cfg.run.name}", *extra]
    return " ".join(parts)
