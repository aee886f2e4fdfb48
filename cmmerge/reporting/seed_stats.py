"""Comparisons of two arms that include seed variance (issue 23): the test over the per-seed
differences of test macro-F1 and a two-level bootstrap over seeds and test examples.

The example-level statistics of :mod:`cmmerge.reporting.stats` resample the test examples only,
so a difference that one lucky seed makes looks certain there. Here:

- the per-seed differences ``d_s = F1_A(s) - F1_B(s)`` (seeds paired) are tested with a paired
  t-test (``scipy.stats.ttest_rel``) below 6 seeds and the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, exact, no normality assumed) from 6 seeds on, where it can first
  reach p < 0.05;
- the two-level bootstrap draws seeds with replacement and, once per replicate, the test units
  (examples, or sentences of a word-level task) with replacement for every seed (the seeds share
  one test set), and takes the mean over the drawn seeds of the difference: its percentile
  interval and two-sided p-value cover both the seed and the test-set variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from cmmerge.reporting.stats import Interval, f1_of_counts, unit_counts

WILCOXON_FROM = 6  # seeds: below, the signed-rank test cannot reach p < 0.05 (2 / 2**5)


@dataclass(frozen=True)
class SeedLevel:
    """Arm A minus arm B over seeds: the per-seed differences, the paired test over them and
    the two-level bootstrap (interval and p-value)."""

    differences: tuple[float, ...]
    test: str  # "t-test" or "wilcoxon": the paired test over seeds used (see :func:`paired`)
    p_value: float  # that test's two-sided p-value (nan with fewer than 2 seeds)
    p_ttest: float
    p_wilcoxon: float
    interval: Interval  # two-level bootstrap of the mean difference
    p_bootstrap: float

    @property
    def n_seeds(self) -> int:
        return len(self.differences)


def seed_scores(gold: np.ndarray, preds: np.ndarray, n_labels: int) -> np.ndarray:
    """Test macro-F1 of each seed: ``preds`` ``[seeds, n]`` -> ``[seeds]``."""
    counts = unit_counts(gold, preds, n_labels)
    return f1_of_counts(counts.sum(axis=1), n_labels)


def ttest(differences: np.ndarray) -> float:
    """Two-sided paired t-test p-value of per-seed differences (``scipy.stats.ttest_rel``
    of the two arms' scores is the same test); nan below 2 seeds, 1 when all are 0."""
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return math.nan
    if not d.any():
        return 1.0
    if np.ptp(d) == 0:  # the same non-zero difference on every seed
        return 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def wilcoxon(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of per-seed differences (exact where scipy can,
    zero differences dropped); nan without seeds, 1 when all are 0."""
    d = np.asarray(differences, dtype=float)
    if d.size < 1:
        return math.nan
    if not d.any():
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired(differences: np.ndarray) -> tuple[str, float]:
    """(name, p-value) of the paired test over seeds: the t-test below
    :data:`WILCOXON_FROM` seeds, the Wilcoxon signed-rank test from there on."""
    d = np.asarray(differences, dtype=float)
    if d.size >= WILCOXON_FROM:
        return "wilcoxon", wilcoxon(d)
    return "t-test", ttest(d)


def two_level_bootstrap(
    gold: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    n_labels: int,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    units: np.ndarray | None = None,
    batch: int = 100,
) -> tuple[Interval, float]:
    """(mean difference of A and B over seeds with its percentile interval, two-sided p-value)
    from a bootstrap that draws seeds, then test units, with replacement (module docstring).

    Args:
        gold: ``[n]`` gold label ids.
        preds_a, preds_b: ``[seeds, n]`` predictions of the two arms, the same seeds in order.
        units: ``[n]`` resampling unit of each example (its sentence); None: each example.
    """
    counts_a = unit_counts(gold, preds_a, n_labels, units).astype(float)
    counts_b = unit_counts(gold, preds_b, n_labels, units).astype(float)
    n_seeds, n_units, _ = counts_a.shape
    estimate = float(
        (f1_of_counts(counts_a.sum(1), n_labels) - f1_of_counts(counts_b.sum(1), n_labels)).mean()
    )
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, batch):
        m = min(batch, n_resamples - start)
        picks = rng.integers(0, n_units, size=(m, n_units)) + np.arange(m)[:, None] * n_units
        weights = np.bincount(picks.ravel(), minlength=m * n_units).reshape(m, n_units)
        f_a = f1_of_counts(np.einsum("mu,suk->msk", weights, counts_a), n_labels)  # [m, S]
        f_b = f1_of_counts(np.einsum("mu,suk->msk", weights, counts_b), n_labels)
        seeds = rng.integers(0, n_seeds, size=(m, n_seeds))
        draws.append((f_a - f_b)[np.arange(m)[:, None], seeds].mean(axis=1))
    diffs = np.concatenate(draws)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    below = (np.sum(diffs <= 0) + 1) / (diffs.size + 1)
    above = (np.sum(diffs >= 0) + 1) / (diffs.size + 1)
    return Interval(estimate, float(low), float(high)), float(min(1.0, 2 * min(below, above)))


def compare_seeds(
    gold: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    n_labels: int,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    units: np.ndarray | None = None,
) -> SeedLevel:
    """Arm A minus arm B with seed variance: per-seed differences, the paired tests over them
    and the two-level bootstrap (arguments as :func:`two_level_bootstrap`)."""
    preds_a, preds_b = np.atleast_2d(preds_a), np.atleast_2d(preds_b)
    if preds_a.shape != preds_b.shape:
        raise ValueError(f"paired arms need the same shape: {preds_a.shape} vs {preds_b.shape}")
    d = seed_scores(gold, preds_a, n_labels) - seed_scores(gold, preds_b, n_labels)
    name, p = paired(d)
    interval, p_boot = two_level_bootstrap(
        gold, preds_a, preds_b, n_labels, level, n_resamples, seed, units
    )
    return SeedLevel(
        differences=tuple(float(x) for x in d),
        test=name,
        p_value=p,
        p_ttest=ttest(d),
        p_wilcoxon=wilcoxon(d),
        interval=interval,
        p_bootstrap=p_boot,
    )


def ahead(level: SeedLevel | None, alpha: float) -> int:
    """Which of A and B is better over seeds: 1 (A) or -1 (B) where the paired test over seeds
    and the two-level bootstrap are both below ``alpha`` (the sign of the mean difference), 0
    otherwise (always with fewer than 2 seeds)."""
    if level is None or level.n_seeds < 2 or math.isnan(level.p_value):
        return 0
    if level.p_value >= alpha or level.p_bootstrap >= alpha or level.interval.estimate == 0:
        return 0
    return 1 if level.interval.estimate > 0 else -1


def significant(level: SeedLevel | None, alpha: float) -> bool:
    """Whether A beats B over seeds (:func:`ahead`)."""
    return ahead(level, alpha) == 1
