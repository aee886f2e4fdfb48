"""Classification metrics (scikit-learn): macro-F1 first, as in the paper."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> dict:
    """Flat ``macro_f1``, ``accuracy``, ``weighted_f1``, then ``per_class``, ``confusion_matrix``.

    Args:
        y_true: gold label ids, indices into ``labels``.
        y_pred: predicted label ids.
        labels: label names in id order; every label is reported, even if absent.
    """
    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
        ),
        "n": len(y_true),
        "per_class": {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": {
            "labels": list(labels),
            "matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        },
    }


def trainer_metrics(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the transformers Trainer: scalar metrics only."""
    logits, gold = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    pred = np.asarray(logits).argmax(-1)
    n_labels = np.asarray(logits).shape[-1]
    ids = list(range(n_labels))
    return {
        "macro_f1": float(f1_score(gold, pred, labels=ids, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(gold, pred)),
        "weighted_f1": float(f1_score(gold, pred, labels=ids, average="weighted", zero_division=0)),
    }
