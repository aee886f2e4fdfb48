"""How the report shows a comparison of two arms (:class:`~cmmerge.reporting.stats.Comparison`)
in every table that has one (the paper's, transfer, no code-mixed labels, CPT length): the
seed-level statistics of :mod:`cmmerge.reporting.seed_stats` first (the marks follow them), the
example-level permutation test as a column, the seeds the comparison rests on, and a warning
when they are fewer than :data:`MIN_SEEDS`."""

from __future__ import annotations

import math

from cmmerge.reporting.seed_stats import WILCOXON_FROM, significant
from cmmerge.reporting.stats import Comparison

ALPHA = 0.05
MIN_SEEDS = 5  # fewer seeds per comparison: the report warns
MARKS = {"Full FT": "†", "CPT->FT": "‡"}
LATEX_MARKS = {"Full FT": r"$^\dagger$", "CPT->FT": r"$^\ddagger$"}

HEADER = (
    "difference [95% CI, seeds × examples] | p seeds (test) | p seeds × examples | p examples "
    "| seeds"
)
N_COLUMNS = 5
NOTE = (
    "p seeds: the paired test over per-seed differences (t-test below "
    f"{WILCOXON_FROM} seeds, Wilcoxon signed-rank from {WILCOXON_FROM}); p seeds × examples: "
    "the two-level bootstrap (seeds, then test examples, drawn with replacement); p examples: "
    "the paired permutation test on the test examples, seeds held (no seed variance)."
)


def beats(c: Comparison | None) -> bool:
    """Whether the arm is better than the one it is compared with over seeds (the paired test
    over seeds and the two-level bootstrap both below :data:`ALPHA`)."""
    return c is not None and significant(c.seeds, ALPHA)


def columns(c: Comparison) -> str:
    """The :data:`HEADER` cells of one comparison (the example-level interval where the
    seed-level statistics were not computed)."""
    seeds = c.seeds
    if seeds is None:
        d = c.difference
        return (
            f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (examples) | | | "
            f"{c.p_value:.3f} | {c.n_seeds}"
        )
    d = seeds.interval
    p = "" if math.isnan(seeds.p_value) else f"{seeds.p_value:.3f} ({seeds.test})"
    return (
        f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | {p} | {seeds.p_bootstrap:.3f} | "
        f"{c.p_value:.3f} | {c.n_seeds}"
    )


def blank(n_seeds: int | str = "") -> str:
    """The :data:`HEADER` cells of no comparison (the arm's seeds in the last)."""
    return " |" * (N_COLUMNS - 1) + f" {n_seeds}"


def few_seeds_warning(counts: list[int]) -> str:
    """A warning when some of the comparisons (their seed counts) rest on fewer than
    :data:`MIN_SEEDS` seeds ("" otherwise)."""
    few = [n for n in counts if n < MIN_SEEDS]
    if not few:
        return ""
    return (
        f"\n**Warning:** {len(few)} of {len(counts)} comparisons rest on fewer than {MIN_SEEDS} "
        f"seeds (fewest: {min(few)}): over so few seeds the seed-level tests have little power "
        "and their p-values are rough; run more seeds (pipeline.seeds) before claiming a "
        "difference.\n"
    )
