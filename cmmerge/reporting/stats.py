"""Statistics over seeds and test examples: macro-F1 on resampled test sets, bootstrap
confidence intervals (scipy.stats.bootstrap) and paired significance tests between arms
(scipy.stats.permutation_test, approximate randomisation on the same test examples).

Predictions of several seeds are arrays ``[seeds, examples]`` of label ids; an arm's score is
the mean over its seeds of the test macro-F1, so intervals and tests cover both the test-set
sampling and the seeds given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def unit_counts(
    gold: np.ndarray, preds: np.ndarray, n_labels: int, units: np.ndarray | None = None
) -> np.ndarray:
    """Confusion counts of each resampling unit: ``[seeds, units, K*K]`` (gold-major).

    A unit is one example, or with ``units`` (a unit id per example, e.g. the sentence of each
    word of a token-level task) every example sharing an id: the bootstrap and the permutation
    test then draw and swap whole sentences, as the examples of one sentence are not independent.
    """
    gold, preds = np.asarray(gold, dtype=np.int64), np.atleast_2d(preds).astype(np.int64)
    n_seeds, k2 = preds.shape[0], n_labels * n_labels
    if units is None:
        index, n_units = np.arange(gold.shape[0]), gold.shape[0]
    else:
        _, index = np.unique(np.asarray(units), return_inverse=True)
        n_units = int(index.max()) + 1 if index.size else 0
    cell = (np.arange(n_seeds)[:, None] * n_units + index[None, :]) * k2
    codes = cell + gold[None, :] * n_labels + preds
    counts = np.bincount(codes.ravel(), minlength=n_seeds * n_units * k2)
    return counts.reshape(n_seeds, n_units, k2)


def f1_of_counts(counts: np.ndarray, n_labels: int) -> np.ndarray:
    """Macro-F1 of summed confusion counts ``[..., K*K]`` -> ``[...]`` (as :func:`macro_f1`)."""
    confusion = counts.reshape(*counts.shape[:-1], n_labels, n_labels)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    denominator = confusion.sum(axis=-2) + confusion.sum(axis=-1)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    return f1.mean(axis=-1)


def _mean_f1(counts: np.ndarray, idx: np.ndarray, n_labels: int) -> np.ndarray:
    """Mean over seeds of the macro-F1 of the units ``idx`` (``[..., m]``) -> ``[...]``."""
    return f1_of_counts(counts[:, idx].sum(axis=-2), n_labels).mean(axis=0)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Comparison:
    """The difference of two arms' mean test macro-F1 on the same examples and seeds: the
    example-level interval and permutation p-value, and (``seeds``) the statistics that include
    seed variance (:class:`cmmerge.reporting.seed_stats.SeedLevel`), where computed."""

    difference: Interval
    p_value: float
    n_seeds: int
    seeds: Any = None  # SeedLevel | None


def score_interval(
    gold: np.ndarray,
    preds: np.ndarray,
    n_labels: int,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    units: np.ndarray | None = None,
) -> Interval:
    """Mean test macro-F1 over seeds with a bootstrap interval (test examples resampled, the
    same resample for every seed; percentile method).

    Args:
        gold: ``[n]`` gold label ids.
        preds: ``[seeds, n]`` predictions of each seed.
        units: ``[n]`` resampling unit of each example (its sentence, for word-level tasks);
            None: every example is a unit.
    """
    counts = unit_counts(gold, preds, n_labels, units)
    index = np.arange(counts.shape[1])

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return _mean_f1(counts, np.moveaxis(np.asarray(idx), axis, -1), n_labels)

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
    units: np.ndarray | None = None,
) -> Comparison:
    """Arm A minus arm B in mean test macro-F1, seeds paired (row i of each is seed i), with a
    paired bootstrap interval and a two-sided paired permutation test's p-value (each unit's
    predictions swapped between the arms at random, every seed at once).

    Args:
        gold: ``[n]`` gold label ids.
        preds_a: ``[seeds, n]`` predictions of arm A.
        preds_b: ``[seeds, n]`` predictions of arm B, the same seeds in the same order.
        units: as for :func:`score_interval`.
    """
    preds_a, preds_b = np.atleast_2d(preds_a), np.atleast_2d(preds_b)
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired arms need the same shape: {preds_a.shape} vs {preds_b.shape}")
    counts_a = unit_counts(gold, preds_a, n_labels, units)
    counts_b = unit_counts(gold, preds_b, n_labels, units)
    index = np.arange(counts_a.shape[1])

    def difference(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx), axis, -1)
        return _mean_f1(counts_a, idx, n_labels) - _mean_f1(counts_b, idx, n_labels)

    interval = _bootstrap(difference, index, level, n_resamples, seed)
    both = np.concatenate([counts_a, counts_b], axis=1)  # unit i of A, then unit i of B

    def swapped(units_a: np.ndarray, units_b: np.ndarray, axis: int = -1) -> np.ndarray:
        units_a, units_b = np.moveaxis(units_a, axis, -1), np.moveaxis(units_b, axis, -1)
        return _mean_f1(both, units_a, n_labels) - _mean_f1(both, units_b, n_labels)

    test = stats.permutation_test(
        (index, index + index.shape[0]),
        swapped,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=np.random.default_rng(seed),
        batch=100,
    )
    return Comparison(interval, float(test.pvalue), preds_a.shape[0])


def mean_sd(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and n."""
    arr = np.asarray(values, dtype=float)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), sd, int(arr.size)
