"""The majority-class baseline: a fine-tune that does no better than always predicting the most
frequent label has learned nothing, and the user should hear it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("cmmerge")


def majority_macro_f1(counts: Sequence[int]) -> float:
    """Macro-F1 of always predicting the most frequent label, over ``len(counts)`` labels.

    That label's F1 is ``2c / (n + c)`` (precision ``c / n``, recall 1); every other label's is 0.
    """
    n = sum(counts)
    if n == 0 or not counts:
        return 0.0
    top = max(counts)
    return 2 * top / (n + top) / len(counts)


def majority_baseline_warning(
    metrics: Mapping[str, Any],
    labels: Sequence[str],
    settings: Mapping[str, Any] | None = None,
    pretrained: bool = False,
) -> str | None:
    """Log (and return) a warning when validation macro-F1 is at or below the majority-class
    baseline, computed from the label counts in ``metrics["per_class"]``; None otherwise.

    Args:
        metrics: validation metrics from :func:`classification_metrics`.
        labels: label names in id order.
        settings: the ``finetune:`` section used, quoted in the suggestion.
        pretrained: the model is a real pretrained one (not a tiny random-initialised model):
            a collapse to one class then more often means a learning rate too high for it.
    """
    per_class = metrics.get("per_class") or {}
    counts = [int(per_class.get(name, {}).get("support", 0)) for name in labels]
    baseline = majority_macro_f1(counts)
    score = float(metrics.get("macro_f1", 0.0))
    if sum(counts) == 0 or score > baseline + 1e-9:
        return None
    top = labels[max(range(len(counts)), key=counts.__getitem__)]
    now = ""
    if settings:
        now = f" (now epochs={settings.get('epochs')}, lr={settings.get('lr')})"
    head = (
        f"validation macro-F1 {score:.4f} is no better than always predicting '{top}' "
        f"({baseline:.4f}): the model learned nothing useful."
    )
    if pretrained:
        advice = _pretrained_advice(settings or {}, now)
    else:
        advice = (
            f" Train longer or faster{now}: raise finetune.epochs or finetune.lr, try "
            "finetune.class_weights=balanced, and use train=smoke for the tiny models "
            "(train=default is sized for real models on a GPU)"
        )
    message = head + advice
    log.warning("%s", message)
    return message


# Above this, fine-tuning a pretrained transformer in full usually diverges (train=smoke's 1e-3
# collapsed Gemma-3-270M to one class; 2e-5 trains it).
_PRETRAINED_MAX_LR = 1e-4


def _pretrained_advice(settings: Mapping[str, Any], now: str) -> str:
    """What to change for a pretrained model that collapsed to one class."""
    try:
        lr = float(settings.get("lr"))
    except (TypeError, ValueError):
        lr = None
    if lr is not None and lr > _PRETRAINED_MAX_LR:
        return (
            f" A pretrained model is usually wrecked by a learning rate this high{now}: lower "
            "finetune.lr (2e-5 for full fine-tuning, about 2e-4 with peft=lora; train=default "
            "has real-model settings; train=smoke is for the tiny random models only)"
        )
    return (
        f" For a pretrained model{now}: train longer (finetune.epochs, more train data), try "
        "finetune.class_weights=balanced; a lower finetune.lr helps if the training loss "
        "jumped up, a higher one (within 1e-4) if it stayed flat"
    )
