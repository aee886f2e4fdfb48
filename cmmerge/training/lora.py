"""LoRA through peft: target modules per model family, checked against the model's modules."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from cmmerge import dist
from cmmerge.errors import CmmergeError


def enabled(peft_cfg: Mapping[str, Any] | None) -> bool:
    return bool(peft_cfg) and str(peft_cfg.get("name", "none")) == "lora"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-component names of the model's linear layers (what LoRA can target)."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
        }
    )


def target_modules(model: torch.nn.Module, peft_cfg: Mapping[str, Any]) -> list[str] | str:
    """The configured target modules; names that match no linear layer are an error."""
    targets = peft_cfg.get("target_modules")
    if not targets:
        by_family = peft_cfg.get("targets_by_family") or {}
        targets = by_family.get(model.config.model_type, by_family.get("default", "all-linear"))
    if isinstance(targets, str):
        return targets
    found = linear_module_names(model)
    missing = [t for t in targets if t not in found]
    if missing:
        raise CmmergeError(
            f"LoRA target module(s) {', '.join(missing)} not in {type(model).__name__}; "
            f"its linear modules are: {', '.join(found)}"
        )
    return list(targets)


def wrap(model: torch.nn.Module, peft_cfg: Mapping[str, Any], task: str) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; ``task`` is ``causal_lm``, ``masked_lm``, ``seq_cls``
    or ``token_cls`` (a classification head is then trained in full and saved with the
    adapter)."""
    task_type = {
        "causal_lm": TaskType.CAUSAL_LM,
        "seq_cls": TaskType.SEQ_CLS,
        "token_cls": TaskType.TOKEN_CLS,
    }.get(task)
    config = LoraConfig(
        r=int(peft_cfg["r"]),
        lora_alpha=int(peft_cfg["alpha"]),
        lora_dropout=float(peft_cfg["dropout"]),
        target_modules=target_modules(model, peft_cfg),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def save_trained(trainer, tokenizer, out_dir: Path, peft_cfg: Mapping[str, Any] | None) -> None:
    """Save a training stage's result to ``out_dir/model`` (with LoRA: the adapter to
    ``out_dir/adapter`` and the merged full weights to ``out_dir/model``), then drop the
    Trainer's checkpoints. Rank 0 alone writes under a multi-process launch."""
    model_dir = out_dir / "model"
    if enabled(peft_cfg):
        if dist.is_main():
            trainer.model.save_pretrained(out_dir / "adapter")
            trainer.model.merge_and_unload().save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
    else:
        trainer.save_model(str(model_dir))
        if dist.is_main():
            tokenizer.save_pretrained(model_dir)
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
