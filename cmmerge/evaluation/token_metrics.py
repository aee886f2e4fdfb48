"""Word-level metrics of a token-level task (language identification): every word is one
decision, so precision, recall, F1 per tag, macro-F1 and accuracy are computed over the
flattened words of all sentences (scikit-learn), in the same layout as
:func:`cmmerge.evaluation.metrics.classification_metrics` (``per_class`` holds the per-tag
entries), plus ``n_sentences``. Not seqeval: LID labels words, not BIO spans."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmmerge.evaluation.metrics import classification_metrics


def flatten(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The label ids of every word of every sentence, in order."""
    return [int(x) for seq in sequences for x in seq]


def token_metrics(
    gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], labels: Sequence[str]
) -> dict:
    """``macro_f1``, ``accuracy``, ``weighted_f1``, ``n`` (words), ``n_sentences``, ``unit``,
    then ``per_class`` (per tag) and ``confusion_matrix``, over the words of all sentences.

    Args:
        gold: per sentence, the gold label id of each word.
        pred: per sentence, the predicted label id of each word (as many as ``gold``'s).
        labels: label names in id order.

    Raises:
        ValueError: When a sentence has a different number of predicted and gold words.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences, {len(pred)} predicted")
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold words, {len(p)} predicted")
    metrics = classification_metrics(flatten(gold), flatten(pred), labels)
    per_class = metrics.pop("per_class")
    matrix = metrics.pop("confusion_matrix")
    return {
        **metrics,
        "n_sentences": len(gold),
        "unit": "word",
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def trainer_token_metrics(eval_pred) -> tuple[dict[str, float], list[int], list[int]]:
    """For the Trainer's ``compute_metrics``: logits ``[n, T, K]`` and labels ``[n, T]`` (-100
    where no word starts) -> (scalar metrics, gold ids, predicted ids) over the labelled
    positions, one per word."""
    logits = eval_pred.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    gold = np.asarray(eval_pred.label_ids)
    pred = np.asarray(logits).argmax(-1)
    mask = gold != -100
    g, p = gold[mask].tolist(), pred[mask].tolist()
    n_labels = np.asarray(logits).shape[-1]
    full = classification_metrics(g, p, [str(i) for i in range(n_labels)])
    scalars = {k: full[k] for k in ("macro_f1", "accuracy", "weighted_f1")}
    return scalars, g, p
