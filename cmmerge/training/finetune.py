"""Sequence-classification fine-tuning with the Trainer: best epoch by validation macro-F1."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainerCallback

from cmmerge import dist
from cmmerge.data.stats import tokenize_cached
from cmmerge.errors import CmmergeError
from cmmerge.evaluation.metrics import classification_metrics, trainer_metrics
from cmmerge.models.loading import check_max_length, load_classifier, load_tokenizer
from cmmerge.training import lora
from cmmerge.training.arguments import (
    FiniteLossCallback,
    LogCallback,
    StepTimer,
    precision_name,
    readable_output,
    seed_everything,
    training_arguments,
)


def tokenize_splits(
    splits: DatasetDict, tokenizer, max_length: int, cache_dir: Path | None = None
) -> DatasetDict:
    """Tokenise ``text`` with batched ``datasets.map``, cached on disk under ``cache_dir`` (a
    second run re-uses it); keeps ``label`` as ``labels``."""
    out = {}
    for name, ds in splits.items():
        ds = tokenize_cached(ds, tokenizer, max_length, cache_dir)
        drop = [c for c in ds.column_names if c not in ("input_ids", "attention_mask", "label")]
        out[name] = ds.remove_columns(drop).rename_column("label", "labels")
    return DatasetDict(out)


def class_weights(train_labels: list[int], n_labels: int, mode: str | None) -> torch.Tensor | None:
    """``balanced`` weights (n / (k * count_c)) for an imbalanced task, else None."""
    if not mode or mode == "none":
        return None
    if mode != "balanced":
        raise CmmergeError(f"finetune.class_weights={mode}: use balanced or none")
    counts = torch.bincount(torch.as_tensor(train_labels), minlength=n_labels).float()
    return len(train_labels) / (n_labels * counts.clamp(min=1))


def weighted_loss(weights: torch.Tensor):
    """Class-weighted cross-entropy over the last axis of the logits (one label per text, or
    per token with -100 for the positions that carry none), for ``Trainer.compute_loss_func``."""

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            weight=weights.to(logits.device),
            ignore_index=-100,
        )

    return loss


class EvaluationRecorder(TrainerCallback):
    """``compute_metrics`` that keeps the full validation metrics of every epoch's evaluation,
    so the kept (best) epoch's metrics need no second pass over the validation set."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.by_step: dict[int, dict[str, Any]] = {}
        self._last: dict[str, Any] = {}

    def compute(self, eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = np.asarray(logits).argmax(-1).tolist()
        self._last = classification_metrics(
            np.asarray(eval_pred.label_ids).tolist(), pred, self.labels
        )
        return trainer_metrics(eval_pred)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.by_step[state.global_step] = {
            **self._last,
            "loss": float((metrics or {}).get("eval_loss", float("nan"))),
        }

    def of_best(self, state) -> dict[str, Any]:
        """The metrics of the checkpoint the Trainer kept (the last evaluation if none)."""
        best = state.best_model_checkpoint
        step = int(str(best).rsplit("-", 1)[-1]) if best else max(self.by_step)
        return self.by_step[step]


def train_classifier(
    init_dir: Path,
    splits: DatasetDict,
    labels: list[str],
    params: Mapping[str, Any],
    out_dir: Path,
    seed: int,
    peft_cfg: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``init_dir`` on ``splits['train']``; keeps the epoch best on validation macro-F1.

    Saves the best model and tokenizer to ``out_dir/model`` (with LoRA: the adapter and trained
    head to ``out_dir/adapter``, the merged full model to ``out_dir/model``); returns the
    validation metrics of the kept model (flat scalars, ``per_class``, ``confusion_matrix``) and
    training facts. ``seed`` seeds the RNGs before the model (and its new head) is built, and
    the Trainer's data order and dropout: the same seed gives the same run in any process.
    """
    seed_everything(seed, bool(params.get("full_determinism", False)))
    tokenizer = load_tokenizer(init_dir)
    model = load_classifier(init_dir, labels, tokenizer.pad_token_id)
    check_max_length(model.config, int(params["max_length"]), "finetune.max_length", init_dir)
    if lora.enabled(peft_cfg):
        model = lora.wrap(model, peft_cfg, "seq_cls")
    data = tokenize_splits(
        DatasetDict(train=splits["train"], validation=splits["validation"]),
        tokenizer,
        int(params["max_length"]),
        cache_dir,
    )
    weights = class_weights(list(data["train"]["labels"]), len(labels), params.get("class_weights"))
    return run_trainer(
        model,
        tokenizer,
        data["train"],
        data["validation"],
        DataCollatorWithPadding(tokenizer),
        EvaluationRecorder(labels),
        loss_func=weighted_loss(weights) if weights is not None else None,
        params=params,
        out_dir=out_dir,
        seed=seed,
        peft_cfg=peft_cfg,
    )


def run_trainer(
    model,
    tokenizer,
    train,
    validation,
    collator,
    evaluations: EvaluationRecorder,
    *,
    loss_func,
    params: Mapping[str, Any],
    out_dir: Path,
    seed: int,
    peft_cfg: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Train with a transformers Trainer that evaluates every epoch and keeps the epoch best on
    validation macro-F1 (``evaluations`` computes it), with ``loss_func`` (None: the model's
    loss); save it (:func:`lora.save_trained`) and
    return its validation metrics, the per-epoch history and training facts."""
    args = training_arguments(
        out_dir / "checkpoints",
        params,
        seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="macro_f1",
        greater_is_better=True,
        train_sampling_strategy="group_by_length",
    )
    timer = StepTimer()
    callbacks: list = [LogCallback(), FiniteLossCallback(), timer, evaluations]
    patience = params.get("early_stopping_patience")
    if patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(patience)))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=evaluations.compute,
        callbacks=callbacks,
        compute_loss_func=loss_func,
    )
    readable_output(trainer)  # one line per logged step, no raw dicts
    result = trainer.train()
    metrics = evaluations.of_best(trainer.state)
    history = [
        {"epoch": h["epoch"], "macro_f1": h["eval_macro_f1"], "loss": h["eval_loss"]}
        for h in trainer.state.log_history
        if "eval_macro_f1" in h
    ]
    lora.save_trained(trainer, tokenizer, out_dir, peft_cfg)
    useful_tokens = sum(len(x) for x in train["input_ids"]) * float(
        result.metrics.get("epoch", 1.0)
    )
    return {
        "metrics": metrics,
        "history": history,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "steps": int(result.global_step),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "precision": precision_name(args),
        "train_step_time_s": timer.seconds,
        "train_tokens_per_s": useful_tokens / max(timer.seconds, 1e-9),
    }


def predict(
    model_dir: Path,
    texts: list[str],
    labels: list[str],
    batch_size: int,
    max_length: int,
    gold: list[int],
    work_dir: Path,
) -> tuple[np.ndarray, dict]:
    """Class probabilities for ``texts`` and the metrics against ``gold``."""
    from datasets import Dataset

    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, labels, tokenizer.pad_token_id)
    check_max_length(model.config, max_length, "evaluate.max_length", model_dir)
    ds = Dataset.from_dict({"text": texts, "label": gold})
    data = tokenize_splits(DatasetDict(train=ds), tokenizer, max_length)["train"]
    logits, loss = predict_logits(
        model, tokenizer, data, DataCollatorWithPadding(tokenizer), batch_size, work_dir
    )
    probs = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
    metrics = classification_metrics(gold, probs.argmax(-1).tolist(), labels)
    metrics["loss"] = loss
    return probs, metrics


def predict_logits(
    model, tokenizer, data, collator, batch_size: int, work_dir: Path
) -> tuple[np.ndarray, float]:
    """Float32 logits of ``model`` over ``data`` (a Trainer's ``predict``, batched, on every
    process of a launch) and the mean loss where ``data`` has labels; ``work_dir`` is removed."""
    args = training_arguments(work_dir, {"batch_size": batch_size, "lr": 0.0}, seed=0)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer, data_collator=collator)
    out = trainer.predict(data)
    if dist.is_main():
        shutil.rmtree(work_dir, ignore_errors=True)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    return np.asarray(logits, dtype=np.float32), float(out.metrics.get("test_loss", float("nan")))
