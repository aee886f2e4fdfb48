"""LoRA through peft: target modules per model family, checked against the model's modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

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
    """Wrap ``model`` with LoRA adapters; ``task`` is ``causal_lm``, ``masked_lm`` or ``seq_cls``
    (the classification head is then trained in full and saved with the adapter)."""
    task_type = {"causal_lm": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS}.get(task)
    config = LoraConfig(
        r=int(peft_cfg["r"]),
        lora_alpha=int(peft_cfg["alpha"]),
        lora_dropout=float(peft_cfg["dropout"]),
        target_modules=target_modules(model, peft_cfg),
        task_type=task_type,
    )
    return get_peft_model(model, config)


def merge_and_save(model: PeftModel, model_dir, adapter_dir, tokenizer) -> None:
    """Save the adapter to ``adapter_dir`` and the merged full model to ``model_dir``."""
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
