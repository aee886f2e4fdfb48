"""TrainingArguments shared by the CPT and fine-tuning stages."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

log = logging.getLogger("cmmerge")


class LogCallback(TrainerCallback):
    """Send the Trainer's logs (loss, learning rate, eval metrics) to the stage's log file."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info(
                "step %d: %s",
                state.global_step,
                ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()
                ),
            )


def precision_flags() -> dict[str, bool]:
    """bf16 where the GPU supports it, fp16 on other GPUs, float32 on the CPU."""
    if not torch.cuda.is_available():
        return {}
    if torch.cuda.is_bf16_supported():
        return {"bf16": True}
    return {"fp16": True}


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


def training_arguments(
    out_dir: Path, params: Mapping[str, Any], seed: int, **overrides: Any
) -> TrainingArguments:
    """TrainingArguments from a ``cpt:`` or ``finetune:`` config section.

    Keys read: batch_size, lr, epochs, max_steps, warmup (ratio if < 1, else steps),
    weight_decay, grad_accum, logging_steps.
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
        **precision_flags(),
    )
    args.update(overrides)
    return TrainingArguments(**args)
