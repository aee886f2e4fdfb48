"""Statistics that include seed variance (issue 23, item 1): the paired test over per-seed
differences, the two-level bootstrap (seeds, then test examples), and the report's marks that
follow them. Built on predictions with known per-seed scores."""

from __future__ import annotations

import csv

import numpy as np
from conftest import compose
from omegaconf import OmegaConf
from run_dirs import evaluation_work
from scipy import stats
from sklearn.metrics import f1_score

from cmmerge.commands import report
from cmmerge.config.values import run_context
from cmmerge.reporting.seed_stats import (
    compare_seeds,
    seed_scores,
    significant,
    two_level_bootstrap,
)
from cmmerge.reporting.stats import compare, f1_of_counts, unit_counts
from cmmerge.stages.runner import run_transaction, stage_input

LABELS = ["negative", "neutral", "positive"]
N = 600
GOLD = np.random.default_rng(7).integers(0, 3, N)
BASE = [0.60, 0.70, 0.62, 0.68, 0.65]  # the reference's accuracy per seed: sd 0.04
NOISY = [+0.08, -0.02, +0.07, -0.03, +0.05]  # +0.03 on average, less than the seed spread
STEADY = [+0.05, +0.04, +0.06, +0.05, +0.045]  # +0.05 on every seed


def _preds(accuracies: list[float]) -> np.ndarray:
    """``[seeds, N]`` predictions right on the first ``accuracy * N`` examples of a fixed
    per-seed order (so one arm's errors nest in the other's on each seed)."""
    out = []
    for seed, accuracy in enumerate(accuracies):
        order = np.random.default_rng(100 + seed).permutation(N)
        right = np.zeros(N, dtype=bool)
        right[order[: round(accuracy * N)]] = True
        out.append(np.where(right, GOLD, (GOLD + 1 + seed % 2) % 3))
    return np.stack(out)


def _arm(shift: list[float]) -> np.ndarray:
    return _preds([b + d for b, d in zip(BASE, shift, strict=True)])


def test_per_seed_scores_and_paired_tests_match_scipy_and_sklearn():
    a, b = _arm(NOISY), _preds(BASE)
    scores_a, scores_b = seed_scores(GOLD, a, 3), seed_scores(GOLD, b, 3)
    for s in range(5):
        assert np.isclose(scores_a[s], f1_score(GOLD, a[s], average="macro", labels=[0, 1, 2]))
    level = compare_seeds(GOLD, a, b, 3, n_resamples=200)
    assert np.allclose(level.differences, scores_a - scores_b)
    assert np.isclose(level.p_ttest, stats.ttest_rel(scores_a, scores_b).pvalue)
    assert np.isclose(level.p_wilcoxon, stats.wilcoxon(scores_a, scores_b).pvalue)
    assert level.test == "t-test" and level.p_value == level.p_ttest  # 5 seeds
    six = compare_seeds(GOLD, _preds(BASE + [0.64]), _preds(BASE + [0.6]), 3, n_resamples=50)
    assert six.test == "wilcoxon" and six.p_value == six.p_wilcoxon


def test_the_two_level_bootstrap_is_the_loop_it_stands_for():
    """Replicate by replicate (batch of one): test units drawn with replacement once for every
    seed, then seeds drawn with replacement; the mean over drawn seeds of the macro-F1 gap."""
    a, b = _arm(NOISY)[:3], _preds(BASE)[:3]
    units = np.repeat(np.arange(N // 4), 4)  # sentences of four examples
    interval, p = two_level_bootstrap(GOLD, a, b, 3, n_resamples=60, seed=3, units=units, batch=1)
    rng = np.random.default_rng(3)
    counts_a, counts_b = unit_counts(GOLD, a, 3, units), unit_counts(GOLD, b, 3, units)
    draws = []
    for _ in range(60):
        picks = rng.integers(0, N // 4, size=(1, N // 4))[0]
        seeds = rng.integers(0, 3, size=(1, 3))[0]
        gaps = [
            f1_of_counts(counts_a[s, picks].sum(0), 3) - f1_of_counts(counts_b[s, picks].sum(0), 3)
            for s in seeds
        ]
        draws.append(np.mean(gaps))
    draws = np.array(draws)
    assert np.isclose(interval.low, np.quantile(draws, 0.025))
    assert np.isclose(interval.high, np.quantile(draws, 0.975))
    below, above = (np.sum(draws <= 0) + 1) / 61, (np.sum(draws >= 0) + 1) / 61
    assert np.isclose(p, min(1.0, 2 * min(below, above)))
    assert np.isclose(interval.estimate, np.mean(seed_scores(GOLD, a, 3) - seed_scores(GOLD, b, 3)))


def test_a_gain_smaller_than_the_seed_spread_is_not_marked_a_steady_one_is():
    ref = _preds(BASE)
    noisy = compare_seeds(GOLD, _arm(NOISY), ref, 3, n_resamples=500)
    steady = compare_seeds(GOLD, _arm(STEADY), ref, 3, n_resamples=500)
    # on the test examples alone the noisy gain looks certain; over seeds it is not
    assert compare(GOLD, _arm(NOISY), ref, 3, n_resamples=500).p_value < 0.01
    assert noisy.p_value > 0.1 and noisy.p_bootstrap > 0.05 and not significant(noisy, 0.05)
    assert noisy.interval.low < 0 < noisy.interval.high
    assert steady.p_value < 0.001 and steady.p_bootstrap < 0.01 and significant(steady, 0.05)
    assert not significant(compare_seeds(GOLD, ref, _arm(STEADY), 3, n_resamples=100), 0.05)
    one = compare_seeds(GOLD, _arm(STEADY)[:1], ref[:1], 3, n_resamples=100)
    assert np.isnan(one.p_value) and not significant(one, 0.05)  # one seed: no seed-level test


def _finetune(root, ft_id, arm, seed, pred):
    cfg = OmegaConf.create({"run": {"root": str(root.parent), "name": root.name}, "force": False})
    ft_dir = root / "finetune" / f"{ft_id}-s{seed}"
    result = {"metrics": {"macro_f1": 0.5}, "arm": arm, "task": "t", "merge_id": ""}
    run_transaction(run_context(cfg), "finetune", ft_dir, {"seed": seed}, [], lambda d: result)

    f1 = float(f1_score(GOLD, pred, average="macro"))
    work = evaluation_work(GOLD, pred, f1, f1)
    folder = root / "evaluate" / ft_dir.name / "t"
    inputs = [stage_input(ft_dir, "make it")]
    run_transaction(run_context(cfg), "evaluate", folder, {"task": "t"}, inputs, work)


def test_the_report_marks_follow_the_seed_level_test_and_warns_below_five_seeds(tmp_path):
    arms = {"Full FT": _preds(BASE), "Noisy FT": _arm(NOISY), "Steady FT": _arm(STEADY)}
    for seeds, name in ((5, "five"), (3, "three")):
        for arm, preds in arms.items():
            for seed in range(seeds):
                _finetune(tmp_path / name, arm.replace(" ", "-"), arm, seed, preds[seed])
        cfg = compose("report", [f"run.root={tmp_path}", f"run.name={name}",
                                 "report.n_resamples=300"])  # fmt: skip
        report.run(cfg)
    text = (tmp_path / "five" / "report" / "report.md").read_text()
    table = text.split("## Against")[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "†" in rows["| Steady FT"] and "†" not in rows["| Noisy FT"]
    assert "Warning" not in table
    against = text.split("## Against")[1]
    noisy = next(line for line in against.splitlines() if line.startswith("| Noisy FT"))
    cells = [c.strip() for c in noisy.split("|")]
    assert cells[-2] == "5" and float(cells[-3]) < 0.01  # example-level: "significant"
    assert float(cells[-5].split()[0]) > 0.1  # the paired test over seeds: not
    study = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "five" / "report" / "study.csv"))}
    assert study["Steady FT"]["seed_significant_vs_full_ft"] == "True"
    assert study["Noisy FT"]["seed_significant_vs_full_ft"] == "False"
    assert study["Noisy FT"]["n_seeds_vs_full_ft"] == "5"
    three = (tmp_path / "three" / "report" / "report.md").read_text().split("## Against")[0]
    assert "**Warning:** 2 of 2 comparisons rest on fewer than 5 seeds (fewest: 3)" in three
