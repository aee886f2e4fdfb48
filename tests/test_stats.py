"""Statistics of the report: vectorised macro-F1 equals scikit-learn's, bootstrap intervals
cover the estimate and shrink with more data, paired tests find real differences and not
invented ones."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from cmmerge.reporting.stats import compare, macro_f1, mean_sd, score_interval


def _noisy(gold, accuracy, rng, k=3):
    wrong = rng.random(gold.shape) > accuracy
    return np.where(wrong, (gold + rng.integers(1, k, gold.shape)) % k, gold)


def test_macro_f1_matches_scikit_learn_row_by_row():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 3, 50)
    pred = rng.integers(0, 3, (4, 50))
    pred[0] = 0  # labels never predicted count as 0, as in sklearn with zero_division=0
    got = macro_f1(gold, pred, 3)
    want = [f1_score(gold, p, labels=[0, 1, 2], average="macro", zero_division=0) for p in pred]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 3) == pytest.approx(1 / 3)


def test_score_interval_covers_the_estimate_and_narrows_with_more_examples():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 3, 200)
    large = rng.integers(0, 3, 3000)
    ci_small = score_interval(small, _noisy(small, 0.7, rng)[None], 3, n_resamples=400)
    ci_large = score_interval(large, np.stack([_noisy(large, 0.7, rng)] * 2), 3, n_resamples=400)
    for ci in (ci_small, ci_large):
        assert ci.low < ci.estimate < ci.high
    assert ci_large.high - ci_large.low < 0.5 * (ci_small.high - ci_small.low)
    assert 0.6 < ci_large.estimate < 0.8


def test_paired_comparison_detects_a_real_gap_and_not_a_null_one():
    rng = np.random.default_rng(2)
    gold = rng.integers(0, 3, 1500)
    better = np.stack([_noisy(gold, 0.80, rng) for _ in range(3)])
    worse = np.stack([_noisy(gold, 0.70, rng) for _ in range(3)])
    same = np.stack([_noisy(gold, 0.80, rng) for _ in range(3)])
    real = compare(gold, better, worse, 3, n_resamples=500)
    assert real.p_value < 0.01 and real.difference.low > 0 and real.n_seeds == 3
    assert 0.05 < real.difference.estimate < 0.15
    null = compare(gold, better, same, 3, n_resamples=500)
    assert null.p_value > 0.05 and null.difference.low < 0 < null.difference.high
    flipped = compare(gold, worse, better, 3, n_resamples=500)
    assert flipped.difference.estimate == pytest.approx(-real.difference.estimate)


def test_same_seed_gives_the_same_interval():
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 300)
    pred = _noisy(gold, 0.75, rng, k=2)[None]
    assert score_interval(gold, pred, 2, seed=5) == score_interval(gold, pred, 2, seed=5)


def test_mean_sd():
    assert mean_sd([0.5]) == (0.5, 0.0, 1)
    mean, sd, n = mean_sd([0.5, 0.7, 0.6])
    assert (round(mean, 6), round(sd, 6), n) == (0.6, 0.1, 3)


def test_words_of_a_sentence_are_resampled_together():
    """A token-level task: each sentence of k words that all carry one example's gold and
    prediction scores as that example k times. Drawing whole sentences must then give the
    per-example interval and p-value exactly; drawing words as if independent gives a
    narrower, overconfident interval."""
    rng = np.random.default_rng(4)
    gold = rng.integers(0, 3, 300)
    a = np.stack([_noisy(gold, 0.75, rng) for _ in range(2)])
    b = np.stack([_noisy(gold, 0.70, rng) for _ in range(2)])
    k = 4
    words_gold, words_a, words_b = np.repeat(gold, k), np.repeat(a, k, 1), np.repeat(b, k, 1)
    sentences = np.repeat(np.arange(gold.size), k)

    per_example = score_interval(gold, a, 3, n_resamples=300)
    by_sentence = score_interval(words_gold, words_a, 3, n_resamples=300, units=sentences)
    by_word = score_interval(words_gold, words_a, 3, n_resamples=300)
    assert by_sentence.estimate == pytest.approx(per_example.estimate, abs=1e-12)
    assert (by_sentence.low, by_sentence.high) == pytest.approx(
        (per_example.low, per_example.high), abs=1e-12
    )
    assert by_word.high - by_word.low < 0.7 * (per_example.high - per_example.low)

    want = compare(gold, a, b, 3, n_resamples=300)
    got = compare(words_gold, words_a, words_b, 3, n_resamples=300, units=sentences)
    assert got.p_value == pytest.approx(want.p_value, abs=1e-12)
    assert got.difference.low == pytest.approx(want.difference.low, abs=1e-12)
