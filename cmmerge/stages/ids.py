"""Names of stage folders in a run directory (DESIGN section 3) and of the paper's arms."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from cmmerge.merging.methods import get_method
from cmmerge.settings import merge_scale, run_dir


def _num(x: float) -> str:
    return f"{float(x):g}"


def method_name(cfg: DictConfig) -> str:
    """Canonical merge method name (``tv`` -> ``task_arithmetic``)."""
    return get_method(str(cfg.method.name)).name


def source_names(cfg: DictConfig) -> list[str]:
    """What a run-directory merge combines: ``cpt`` (default) and/or task names (tau of the
    model fine-tuned on that task from the base)."""
    return [str(s) for s in (cfg.get("sources") or ["cpt"])]


def merge_id(cfg: DictConfig) -> str:
    """``<method>-l<lambda>[-d<density>][-src_<sources>][-w<weights>]``."""
    method = get_method(str(cfg.method.name))
    out = f"{method.name}-l{_num(merge_scale(cfg))}"
    if "density" in method.params:
        out += f"-d{_num(cfg.density)}"
    if source_names(cfg) != ["cpt"]:
        out += "-src_" + "+".join(source_names(cfg))
    if cfg.get("weights") is not None and not cfg.get("models") and not cfg.get("task_vectors"):
        out += "-w" + "+".join(_num(w) for w in cfg.weights)
    return out


def init_id(cfg: DictConfig) -> str:
    """What fine-tuning starts from: base, cpt, a merge id, or a folder's name."""
    init = str(cfg.init)
    if init in ("base", "cpt"):
        return init
    if init == "merged":
        return merge_id(cfg)
    return "dir_" + re.sub(r"[^A-Za-z0-9_.]+", "_", Path(init).name or "model")


def _task_list(cfg: DictConfig, key: str) -> list[str]:
    return [str(t) for t in (cfg.finetune.get(key) or [])]


def finetune_id(cfg: DictConfig) -> str:
    """``<init>-<task>[-seq_<tasks>][-joint_<tasks>][-lora]-s<seed>``."""
    parts = [init_id(cfg), str(cfg.task.name)]
    if _task_list(cfg, "sequential"):
        parts.append("seq_" + "+".join(_task_list(cfg, "sequential")))
    if _task_list(cfg, "joint"):
        parts.append("joint_" + "+".join(_task_list(cfg, "joint")))
    if str(cfg.get("peft", {}).get("name", "none")) != "none":
        parts.append(str(cfg.peft.name))
    return "-".join(parts) + f"-s{int(cfg.seed)}"


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
        "cpt": root / "cpt",
        "extract": root / "extract",
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
