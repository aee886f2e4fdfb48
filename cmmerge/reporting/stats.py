"""Statistics over seeds and test examples: macro-F1 on resampled test sets, bootstrap
confidence intervals (scipy.stats.bootstrap) and paired significance tests between arms
(scipy.stats.permutation_test, approximate randomisation on the same test examples).

Predictions of several seeds are arrays ``[seeds, examples]`` of label ids; an arm's score is
the mean over its seeds of the test macro-F1, so intervals and tests cover both the test-set
sampling and the seeds given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def macro_f1(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 over the last axis, every label counted (an absent one scores 0, as
    scikit-learn's ``f1_score(labels=all, average="macro", zero_division=0)``).

    Args:
        gold: ``[..., n]`` gold label ids (broadcast against ``pred``).
        pred: ``[..., n]`` predicted label ids.
        n_labels: K, the number of labels.

    Returns:
        ``[...]`` macro-F1 of each row.
    """
    gold, pred = np.broadcast_arrays(np.asarray(gold), np.asarray(pred))
    lead, n, k = pred.shape[:-1], pred.shape[-1], n_labels
    rows = int(np.prod(lead)) if lead else 1
    offsets = np.arange(rows, dtype=np.int64)[:, None] * (k * k)
    codes = offsets + gold.reshape(rows, n).astype(np.int64) * k + pred.reshape(rows, n)
    confusion = np.bincount(codes.ravel(), minlength=rows * k * k).reshape(rows, k, k)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=2)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return f1.mean(axis=-1).reshape(lead)


def _encode(preds: np.ndarray, n_labels: int) -> np.ndarray:
    """One integer per example holding every seed's prediction: ``[seeds, n]`` -> ``[n]``."""
    powers = n_labels ** np.arange(preds.shape[0], dtype=np.int64)
    return (preds.astype(np.int64) * powers[:, None]).sum(axis=0)


def _decode(codes: np.ndarray, n_seeds: int, n_labels: int) -> np.ndarray:
    """``[..., n]`` codes -> ``[seeds, ..., n]`` predictions."""
    powers = n_labels ** np.arange(n_seeds, dtype=np.int64)
    return (codes[None] // powers.reshape((-1,) + (1,) * codes.ndim)) % n_labels


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """The difference of two arms' mean test macro-F1 on the same examples and seeds."""

    difference: Interval
    p_value: float
    n_seeds: int


def score_interval(
    gold: np.ndarray,
    preds: np.ndarray,
    n_labels: int,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Interval:
    """Mean test macro-F1 over seeds with a bootstrap interval (test examples resampled, the
    same resample for every seed; percentile method).

    Args:
        gold: ``[n]`` gold label ids.
        preds: ``[seeds, n]`` predictions of each seed.
    """
    gold, preds = np.asarray(gold), np.atleast_2d(np.asarray(preds))
    index = np.arange(gold.shape[0])

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        return macro_f1(gold[idx], preds[:, idx], n_labels).mean(axis=0)

    return _bootstrap(statistic, index, level, n_resamples, seed)


def _bootstrap(statistic, index: np.ndarray, level: float, n_resamples: int, seed: int) -> Interval:
    """The statistic on every example and its percentile bootstrap interval (examples resampled
    by index, vectorised, seeded)."""
    result = stats.bootstrap(
        (index,),
        statistic,
        vectorized=True,
        n_resamples=n_resamples,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
        batch=100,
    )
    ci = result.confidence_interval
    return Interval(float(statistic(index)), float(ci.low), float(ci.high))


def compare(
    gold: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    n_labels: int,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Arm A minus arm B in mean test macro-F1, seeds paired (row i of each is seed i), with a
    paired bootstrap interval and a two-sided paired permutation test's p-value (each example's
    predictions swapped between the arms at random, every seed at once).

    Args:
        gold: ``[n]`` gold label ids.
        preds_a: ``[seeds, n]`` predictions of arm A.
        preds_b: ``[seeds, n]`` predictions of arm B, the same seeds in the same order.
    """
    gold = np.asarray(gold)
    preds_a, preds_b = np.atleast_2d(preds_a), np.atleast_2d(preds_b)
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired arms need the same shape: {preds_a.shape} vs {preds_b.shape}")
    n_seeds = preds_a.shape[0]
    index = np.arange(gold.shape[0])

    def difference(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        a = macro_f1(gold[idx], preds_a[:, idx], n_labels).mean(axis=0)
        return a - macro_f1(gold[idx], preds_b[:, idx], n_labels).mean(axis=0)

    interval = _bootstrap(difference, index, level, n_resamples, seed)

    def swapped(codes_a: np.ndarray, codes_b: np.ndarray, axis: int = -1) -> np.ndarray:
        codes_a, codes_b = np.moveaxis(codes_a, axis, -1), np.moveaxis(codes_b, axis, -1)
        a = macro_f1(gold, _decode(codes_a, n_seeds, n_labels), n_labels).mean(axis=0)
        return a - macro_f1(gold, _decode(codes_b, n_seeds, n_labels), n_labels).mean(axis=0)

    test = stats.permutation_test(
        (_encode(preds_a, n_labels), _encode(preds_b, n_labels)),
        swapped,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
        batch=100,
    )
    return Comparison(interval, float(test.pvalue), n_seeds)


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and n."""
    arr = np.asarray(values, dtype=float)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd, int(arr.size)
