"""TrainingArguments shared by the CPT and fine-tuning stages."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    enable_full_determinism,
    set_seed,
)

from cmmerge.errors import CmmergeError

log = logging.getLogger("cmmerge")


def seed_everything(seed: int, full_determinism: bool = False) -> None:
    """Seed Python, numpy and torch (CPU and GPUs) with transformers' own helpers.

    Call it before any model is built: a new head (classifier, MLM head) is initialised from the
    global torch RNG when the model is created, long before the Trainer seeds anything, and the
    RNG state then depends on whatever ran earlier in the process. ``full_determinism`` also
    makes torch use deterministic kernels (slower; for GPUs).
    """
    if full_determinism:
        enable_full_determinism(seed)
    else:
        set_seed(seed)


class LogCallback(TrainerCallback):
    """Send the Trainer's logs (loss, learning rate, eval metrics) to the stage's log file, and
    log the last step too: the Trainer then sums only losses gathered from every process into
    ``training_loss`` (the rest since the last log would be this process's loss times the
    number of processes, its scaling for the gradient under a multi-process launch). A step
    that saves a checkpoint is logged as well, so the log history a checkpoint carries covers
    every step before it (:func:`whole_run_loss` of a resumed run)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_save:
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            log.info("%s", step_line(state.global_step, state.max_steps, logs))


# Timing details the Trainer logs with every evaluation: kept in trainer_state.json only.
_UNSHOWN = ("_per_second", "_preparation_time", "eval_runtime", "total_flos", "epoch")


def step_line(step: int, max_steps: int, logs: Mapping[str, Any]) -> str:
    """One readable line for a Trainer log: ``step 50/188 (epoch 1.06): loss=1.099, ...``."""
    epoch = logs.get("epoch")
    where = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    if isinstance(epoch, int | float):
        where += f" (epoch {epoch:.3g})"
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in logs.items()
        if not any(k.endswith(u) or k == u for u in _UNSHOWN)
    )
    return f"{where}: {shown}"


class ProgressBars(ProgressCallback):
    """The Trainer's tqdm bars (training, evaluation), without the raw log dicts it writes
    under them: :class:`LogCallback` logs each step on one line."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def readable_output(trainer: Trainer) -> Trainer:
    """One line per logged step and nothing else: the Trainer's printer (which prints every log
    as a raw dict) is removed; its progress bars stay where stderr is a terminal."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(ProgressBars())
    return trainer


class FiniteLossCallback(TrainerCallback):
    """Stop training with a :class:`CmmergeError` as soon as a logged training loss is NaN or
    infinite. The Trainer's NaN filter is off (``logging_nan_inf_filter=False``), so one bad
    step makes the mean of its logging window non-finite, and the last step is always logged."""

    def __init__(self) -> None:
        self.last_good_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(float(loss)):
            raise CmmergeError(
                f"the training loss became {loss} between steps {self.last_good_step + 1} and "
                f"{state.global_step}: training stopped (lower the learning rate, or check the "
                "model and data); nothing was saved"
            )
        self.last_good_step = state.global_step


def whole_run_loss(log_history: list[dict]) -> float | None:
    """Mean training loss over every step the log history covers (a resumed run's history
    includes the steps before the checkpoint): each logged ``loss`` is the mean of its window
    since the previous log, weighted here by the window's length in steps."""
    total, steps, last = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += float(entry["loss"]) * (entry["step"] - last)
            steps += entry["step"] - last
            last = entry["step"]
    return total / steps if steps else None


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


# report_to choices and the modules each needs (any one of them)
INTEGRATIONS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def report_to(value: Any, out_dir: Path | None = None) -> list[str]:
    """``cpt.report_to`` / ``finetune.report_to`` (none | tensorboard | wandb, or a list) as
    TrainingArguments takes it. An integration that is not installed is refused in one line.
    TensorBoard writes beside ``out_dir`` (the Trainer's checkpoint folder, deleted after
    training), in the stage's ``tensorboard/``."""
    names = [value] if isinstance(value, str) else [str(v) for v in value or []]
    names = [n for n in names if n and n != "none"]
    for name in names:
        if name not in INTEGRATIONS:
            raise CmmergeError(f"report_to={name}: choose none, {', '.join(INTEGRATIONS)}")
        if not any(importlib.util.find_spec(m) for m in INTEGRATIONS[name]):
            raise CmmergeError(
                f"report_to={name}: {name} is not installed (pip install {name}); or report_to=none"
            )
    if "tensorboard" in names and out_dir is not None:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(out_dir).parent / "tensorboard")
    return names or ["none"]


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
    weight_decay, grad_accum, logging_steps, precision, full_determinism.
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
        full_determinism=bool(params.get("full_determinism", False)),
        logging_nan_inf_filter=False,  # a NaN loss must show (FiniteLossCallback stops on it)
        report_to=report_to(params.get("report_to"), out_dir),
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        save_only_model=True,
        ddp_find_unused_parameters=False,
        use_cpu=not torch.cuda.is_available(),
        **precision_flags(params.get("precision", "auto")),
    )
    args.update(overrides)
    return TrainingArguments(**args)
