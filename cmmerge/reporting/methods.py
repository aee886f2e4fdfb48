"""The report's "Merge methods against each other" section, the paper's "TV vs TIES": every pair
of chosen merged arms of one task with different methods (each at the λ and density it chose on
validation), made from the same CPT with the same fine-tuning settings, compared on the same test
examples and seeds with the statistics of the paper's table (:mod:`.comparisons`)."""

from __future__ import annotations

from cmmerge.reporting import comparisons, variants
from cmmerge.reporting.paper import scale_label, sort_key
from cmmerge.reporting.seed_stats import ahead
from cmmerge.reporting.stats import Comparison
from cmmerge.reporting.study import Arm, partner_label, row_label, versus


def _without_merge(settings: dict[str, str]) -> dict[str, str]:
    """The settings apart from the merge itself (method, λ, density: the arms compared)."""
    return {k: v for k, v in settings.items() if not k.startswith("merge.")}


def _like_for_like(a: Arm, b: Arm) -> bool:
    """Same task and the same settings but for the merge (a CPT and sources included: both
    must have the same ones)."""
    sa, sb = _without_merge(a.settings), _without_merge(b.settings)
    return a.task == b.task and sa.keys() == sb.keys() and not variants.like_for_like(sa, sb)


def pairs(arms: list[Arm]) -> list[tuple[Arm, Arm]]:
    """(A, B) for every two shown, chosen merged arms of different methods that are like for
    like, A before B in the paper's row order (TV->FT before TIES->FT)."""
    merged = [a for a in arms if a.merge and a.chosen and a.shown]
    merged.sort(key=lambda a: (sort_key(row_label(a)), a.run))
    return [
        (a, b)
        for i, a in enumerate(merged)
        for b in merged[i + 1 :]
        if a.merge.get("method") != b.merge.get("method") and _like_for_like(a, b)
    ]


def compare(arms: list[Arm], n_resamples: int = 1000, seed: int = 0) -> list[tuple]:
    """(A, B, test task, comparison of A minus B) for every pair of :func:`pairs` on each test
    task both were scored on (their own and the transfer tasks)."""
    out = []
    for a, b in pairs(arms):
        tasks = sorted(
            {t for m in a.members for t in m.tests} & {t for m in b.members for t in m.tests}
        )
        for task in tasks:
            found, _ = versus(a, b, task, n_resamples, seed)
            if found is not None:
                out.append((a, b, task, found))
    return out


def _verdict(a: Arm, b: Arm, c: Comparison) -> str:
    """Which of the two is better over seeds (:func:`.seed_stats.ahead`), or neither."""
    side = ahead(c.seeds, comparisons.ALPHA)
    return {1: row_label(a), -1: row_label(b)}.get(side, "neither")


def markdown(found: list[tuple]) -> str:
    """The section's table of :func:`compare`'s pairs ("" without one): A minus B per test task,
    the seed-level and example-level statistics, which is better over seeds; a warning below
    the seeds wanted."""
    if not found:
        return ""
    lines = [
        f"| arm | vs | tested on | {comparisons.HEADER} | better over seeds |",
        "|---|---|---|" + "---|" * comparisons.N_COLUMNS + "---|",
    ]
    for a, b, task, c in found:
        first = f"{row_label(a)} ({scale_label(a)})"
        second = f"{partner_label(b, a)} ({scale_label(b)})"
        lines.append(
            f"| {first} | {second} | {task} | {comparisons.columns(c)} | {_verdict(a, b, c)} |"
        )
    note = (
        "\nThe difference is the first arm minus the second (test macro-F1), each at the λ and "
        "density chosen on its validation split, on the same test examples and seeds; both are "
        "made from the same CPT with the same fine-tuning settings. Better over seeds: both "
        f"seed-level tests below p = {comparisons.ALPHA}. {comparisons.NOTE}\n"
    )
    counts = [c.n_seeds for *_, c in found]
    return "\n".join(lines) + "\n" + note + comparisons.few_seeds_warning(counts)


def rows(found: list[tuple]) -> list[dict]:
    """One CSV row per pair and test task of :func:`compare` (``methods.csv``)."""
    out = []
    for a, b, task, c in found:
        level = c.seeds
        out.append(
            {
                "arm": row_label(a),
                "lambda": a.merge.get("lambda"),
                "density": a.merge.get("density"),
                "versus": partner_label(b, a),
                "versus_lambda": b.merge.get("lambda"),
                "versus_density": b.merge.get("density"),
                "train_task": a.task,
                "test_task": task,
                "difference": level.interval.estimate if level else c.difference.estimate,
                "ci_low": level.interval.low if level else c.difference.low,
                "ci_high": level.interval.high if level else c.difference.high,
                "seed_test": level.test if level else None,
                "seed_p": level.p_value if level else None,
                "seed_boot_p": level.p_bootstrap if level else None,
                "example_p": c.p_value,
                "n_seeds": c.n_seeds,
                "better": _verdict(a, b, c),
            }
        )
    return out
