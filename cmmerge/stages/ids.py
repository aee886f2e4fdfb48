"""Names of stage folders in a run directory (DESIGN section 3) and of the paper's arms.

Each name is derived from the stage's spec: the settings that change its outputs. The readable
part names what is usually varied (``ties-l0.5-d0.2``, ``cpt@en-hi-sentiment-en-hi-s0``); every
other setting that differs from its preset (the method's file, the ``train`` group's presets)
adds a short hash of the differences, so two variants never share a folder. Stages made from a
CPT carry its id after ``@``: several CPT variants (corpus, duration) live in one run directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cmmerge.merging.methods import get_method, resolve_params
from cmmerge.settings import CONFIG_DIR, merge_scale, plain, run_dir

# Settings of a section that only change how fast or how verbosely a stage runs.
_NOT_OUTPUT = {"logging_steps", "report_to", "save_steps", "sequential", "joint"}


def _num(x: float) -> str:
    return f"{float(x):g}"


def short_hash(obj: Any) -> str:
    """Six hex digits identifying ``obj`` (a plain, JSON-able value)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:6]


@cache
def _presets(section: str) -> dict[str, dict]:
    """``{preset: settings}`` of a section (``cpt``, ``finetune``) in every ``train`` preset."""
    out = {}
    for path in sorted((CONFIG_DIR / "train").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict) and isinstance(node.get(section), dict):
            out[path.stem] = node[section]
    return out


def _differences(settings: dict, section: str) -> dict:
    """The settings that differ from the closest ``train`` preset (with that preset's name)."""
    settings = {k: v for k, v in settings.items() if k not in _NOT_OUTPUT}
    best: dict | None = None
    for name, preset in _presets(section).items():
        diff = {k: v for k, v in settings.items() if preset.get(k, object()) != v}
        if best is None or len(diff) < len(best) - 1:
            best = {"preset": name, **diff}
    if best is None or len(best) == 1:
        return {}
    return best


def _suffix(differences: dict) -> str:
    return f"-{short_hash(differences)}" if differences else ""


def method_name(cfg: DictConfig) -> str:
    """Canonical merge method name (``tv`` -> ``task_arithmetic``)."""
    return get_method(str(cfg.method.name)).name


def source_names(cfg: DictConfig) -> list[str]:
    """What a run-directory merge combines: ``cpt`` (default) and/or task names (tau of the
    model fine-tuned on that task from the base)."""
    return [str(s) for s in (cfg.get("sources") or ["cpt"])]


def cpt_id(cfg: DictConfig) -> str:
    """``<corpus>[-lora][-<hash>]``: the corpus, LoRA, and a hash of every other CPT setting
    that differs from its ``train`` preset (duration, learning rate, seed...)."""
    peft = plain(cfg.get("peft")) or {"name": "none"}
    diff = _differences(plain(cfg.cpt), "cpt")
    if peft.get("name", "none") != "none":
        diff_peft = {k: v for k, v in peft.items() if k != "targets_by_family"}
        if diff_peft != _default_lora():
            diff = {**diff, "peft": diff_peft}
    lora = "-" + str(peft["name"]) if peft.get("name", "none") != "none" else ""
    return f"{cfg.corpus.name}{lora}{_suffix(diff)}"


@cache
def _default_lora() -> dict:
    node = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "peft" / "lora.yaml"))
    return {k: v for k, v in node.items() if k != "targets_by_family"}


def merge_spec(cfg: DictConfig) -> dict:
    """Every setting that changes a run-directory merge's tensors."""
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
    return {
        "method": method,
        "lambda": merge_scale(cfg),
        "params": params,
        "sources": source_names(cfg),
        "weights": None if cfg.get("weights") is None else [float(w) for w in cfg.weights],
        "dtype": None if cfg.get("dtype") is None else str(cfg.dtype),
        "cpt": cpt_id(cfg),
    }


def merge_id(cfg: DictConfig) -> str:
    """``<method>-l<lambda>[-d<density>][-src_<sources>][-w<weights>][-<hash>]@<cpt-id>``."""
    spec = merge_spec(cfg)
    out = f"{spec['method']}-l{_num(spec['lambda'])}"
    params = dict(spec["params"])
    if "density" in params:
        out += f"-d{_num(params.pop('density'))}"
    if spec["sources"] != ["cpt"]:
        out += "-src_" + "+".join(spec["sources"])
    if spec["weights"] is not None and not cfg.get("models") and not cfg.get("task_vectors"):
        out += "-w" + "+".join(_num(w) for w in spec["weights"])
    defaults = resolve_params(spec["method"], sign="sum", trim_scope="tensor", seed=0)
    diff = {k: v for k, v in params.items() if defaults.get(k) != v}
    if spec["dtype"] is not None:
        diff["dtype"] = spec["dtype"]
    return f"{out}{_suffix(diff)}@{spec['cpt']}"


def init_id(cfg: DictConfig) -> str:
    """What fine-tuning starts from: base, ``cpt@<cpt-id>``, a merge id, or a folder's name."""
    init = str(cfg.init)
    if init == "base":
        return init
    if init == "cpt":
        return f"cpt@{cpt_id(cfg)}"
    if init == "merged":
        return merge_id(cfg)
    return "dir_" + re.sub(r"[^A-Za-z0-9_.]+", "_", Path(init).name or "model")


def _task_list(cfg: DictConfig, key: str) -> list[str]:
    return [str(t) for t in (cfg.finetune.get(key) or [])]


def finetune_id(cfg: DictConfig) -> str:
    """``<init>-<task>[-seq_<tasks>][-joint_<tasks>][-lora][-<hash>]-s<seed>``; the hash covers
    the training settings (lr, epochs, max_length, class weights...) that differ from the
    ``train`` preset, and LoRA settings other than the defaults."""
    parts = [init_id(cfg), str(cfg.task.name)]
    if _task_list(cfg, "sequential"):
        parts.append("seq_" + "+".join(_task_list(cfg, "sequential")))
    if _task_list(cfg, "joint"):
        parts.append("joint_" + "+".join(_task_list(cfg, "joint")))
    diff = _differences(plain(cfg.finetune), "finetune")
    peft = plain(cfg.get("peft")) or {"name": "none"}
    if peft.get("name", "none") != "none":
        parts.append(str(peft["name"]))
        diff_peft = {k: v for k, v in peft.items() if k != "targets_by_family"}
        if diff_peft != _default_lora():
            diff = {**diff, "peft": diff_peft}
    return "-".join(parts) + _suffix(diff) + f"-s{int(cfg.seed)}"


def source_finetune_id(cfg: DictConfig, task: str) -> str:
    """The fine-tune whose task vector a multi-source merge takes for ``task``: the base
    fine-tuned on it with this config's training settings and seed."""
    other = cfg.copy()
    from omegaconf import open_dict

    with open_dict(other):
        other.init = "base"
        other.task = {"name": task}
        other.finetune.sequential = []
        other.finetune.joint = []
    return finetune_id(other)


def arm_name(cfg: DictConfig) -> str:
    """The paper's name of the arm this fine-tuning run belongs to."""
    lora = " (LoRA)" if str(cfg.get("peft", {}).get("name", "none")) == "lora" else ""
    if _task_list(cfg, "sequential"):
        return f"Sequential FT ({' -> '.join(_task_list(cfg, 'sequential'))} first){lora}"
    if _task_list(cfg, "joint"):
        return f"Joint FT (+{'+'.join(_task_list(cfg, 'joint'))}){lora}"
    return _init_arm(cfg) + lora


def _init_arm(cfg: DictConfig) -> str:
    init = str(cfg.init)
    if init == "base":
        return "Full FT"
    if init == "cpt":
        return "CPT->FT"
    if init == "merged":
        short = {"task_arithmetic": "TV", "ties": "TIES"}.get(method_name(cfg), method_name(cfg))
        sources = "" if source_names(cfg) == ["cpt"] else f"{'+'.join(source_names(cfg))}, "
        return f"{short}->FT ({sources}lambda={_num(merge_scale(cfg))})"
    return f"FT from {init}"


def stage_dirs(cfg: DictConfig) -> dict[str, Path]:
    root = run_dir(cfg)
    return {
        "run": root,
        "data": root / "data",
        "cpt": root / "cpt" / cpt_id(cfg),
        "extract": root / "extract" / cpt_id(cfg),
        "merge": root / "merge" / merge_id(cfg),
        "finetune": root / "finetune" / finetune_id(cfg),
        "evaluate": root / "evaluate" / finetune_id(cfg),
        "sweep": root / "sweep",
        "report": root / "report",
    }


def cli_hint(cfg: DictConfig, stage: str, *extra: str) -> str:
    """The command that makes a missing upstream stage."""
    parts = ["cmmerge", stage, f"run.root={cfg.run.root}", f"run.name={cfg.run.name}", *extra]
    return " ".join(parts)
