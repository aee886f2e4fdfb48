"""TrainingArguments shared by the CPT and fine-tuning stages."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from cmmerge.errors import CmmergeError

log = logging.getLogger("cmmerge")


class LogCallback(TrainerCallback):
    """Send the Trainer's logs (loss, learning rate, eval metrics) to the stage's log file, and
    log the last step too: the Trainer then sums only losses gathered from every process into
    ``training_loss`` (the rest since the last log would be this process's loss times the
    number of processes, its scaling for the gradient under a multi-process launch)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info(
                "step %d: %s",
                state.global_step,
                ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                ),
            )


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_flags(choice: str | None = "auto") -> dict[str, bool]:
    """TrainingArguments flags for ``cpt.precision`` / ``finetune.precision``.

    ``auto``: bf16 where the GPU supports it, fp16 on other GPUs, float32 on the CPU;
    ``fp32``, ``bf16`` (mixed precision, also on CPUs) and ``fp16`` (GPUs only) force one.
    """
    name = str(choice or "auto").lower()
    if name not in PRECISIONS:
        raise CmmergeError(f"precision must be one of {', '.join(PRECISIONS)}; got {choice!r}")
    cuda = torch.cuda.is_available()
    if name == "auto":
        if not cuda:
            return {"bf16": False, "fp16": False}
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and not cuda:
        raise CmmergeError("precision=fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise CmmergeError("precision=bf16: this GPU does not support bfloat16; use fp16")
    return {"bf16": name == "bf16", "fp16": name == "fp16"}


def precision_name(args: TrainingArguments) -> str:
    """The precision a TrainingArguments object trains in: ``bf16``, ``fp16`` or ``fp32``."""
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


class StepTimer(TrainerCallback):
    """Wall time spent in training steps only (no evaluation, saving or set-up)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._start


def _report_to(value: Any) -> list[str]:
    if not value:
        return ["none"]
    return [value] if isinstance(value, str) else [str(v) for v in value]


def activation_checkpointing(enabled: bool) -> dict[str, bool]:
    """The TrainingArguments flag for activation checkpointing: ``activation_checkpointing`` in
    recent transformers 5 releases, ``gradient_checkpointing`` in earlier ones (5.17 has only
    that one)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return {"activation_checkpointing": enabled}
    return {"gradient_checkpointing": enabled}


def training_arguments(
    out_dir: Path, params: Mapping[str, Any], seed: int, **overrides: Any
) -> TrainingArguments:
    """TrainingArguments from a ``cpt:`` or ``finetune:`` config section.

    Keys read: batch_size, lr, epochs, max_steps, warmup (ratio if < 1, else steps),
    weight_decay, grad_accum, logging_steps, precision.
    """
    args: dict[str, Any] = dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=int(params["batch_size"]),
        per_device_eval_batch_size=int(params.get("eval_batch_size") or params["batch_size"]),
        gradient_accumulation_steps=int(params.get("grad_accum", 1)),
        learning_rate=float(params["lr"]),
        num_train_epochs=float(params.get("epochs", 1)),
        max_steps=int(params.get("max_steps") or -1),
        warmup_steps=float(params.get("warmup", 0.0)),
        weight_decay=float(params.get("weight_decay", 0.0)),
        lr_scheduler_type=str(params.get("scheduler", "linear")),
        logging_steps=int(params.get("logging_steps", 50)),
        seed=seed,
        data_seed=seed,
        report_to=_report_to(params.get("report_to")),
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        save_only_model=True,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(params.get("precision", "auto")),
    )
    args.update(overrides)
    return TrainingArguments(**args)
