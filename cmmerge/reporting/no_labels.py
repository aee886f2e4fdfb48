"""The report's "No code-mixed labels" section: grafts (``cmmerge graft``: the base fine-tuned
on a task in one language, e.g. English, plus lambda * tau_cpt, not trained further) on the
code-mixed test set, beside the models fine-tuned on that labelled task alone (Full FT and
CPT->FT on English, a transfer cell) and, as the ceiling, the arms trained with code-mixed
labels; then every lambda of each graft with its validation and test scores.

Reads the arms and cells of :mod:`cmmerge.reporting.study` (lambda chosen there on mean
validation macro-F1, never test) and the graft manifests for what each graft was made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmmerge.io.manifest import read_manifest
from cmmerge.reporting.stats import Comparison, compare
from cmmerge.reporting.study import Arm, Cell


@dataclass
class Graft:
    """A graft arm and what it was made from."""

    arm: Arm
    onto: str  # the labelled task its fine-tune was trained on


def grafts(arms: list[Arm]) -> list[Graft]:
    """The arms of graft stages (read from their first seed's manifest)."""
    out = []
    for arm in arms:
        first = arm.members[0]
        manifest = read_manifest(Path(first.run) / "finetune" / f"{arm.group}-s{first.seed}")
        if manifest and manifest.get("stage") == "graft" and manifest.get("onto"):
            out.append(Graft(arm, str(manifest["onto"])))
    return out


def _versus(arm: Arm, ref: Arm, task: str, n_resamples: int, seed: int) -> Comparison | None:
    """``arm`` minus ``ref`` on ``task``'s test examples, seeds paired."""
    seeds = [
        m.seed
        for m in arm.members
        if task in m.tests and any(r.seed == m.seed and task in r.tests for r in ref.members)
    ]
    if not seeds:
        return None
    gold, preds_a, k = arm.predictions(task, seeds)
    ref_gold, preds_b, _ = ref.predictions(task, seeds)
    if gold.shape != ref_gold.shape or (gold != ref_gold).any():
        return None
    return compare(
        gold, preds_a, preds_b, k, n_resamples=n_resamples, seed=seed, units=arm.units(task)
    )


def _label(arm: Arm, several_runs: bool) -> str:
    from cmmerge.reporting.paper import row_label

    label = row_label(arm)
    return f"{label} ({Path(arm.run).name})" if several_runs else label


def _score(cell: Cell) -> str:
    return f"{cell.mean:.4f} ± {cell.sd:.4f} (n={cell.n})"


def _lambda(arm: Arm) -> str:
    if not arm.merge:
        return ""
    density = arm.merge.get("density")
    return f"{arm.merge['lambda']:g}" + (f" (d={density:g})" if density is not None else "")


def markdown(
    arms: list[Arm], cells: dict[tuple, Cell], n_resamples: int = 1000, seed: int = 0
) -> str:
    """The section as Markdown ("" when the study has no graft)."""
    found = grafts(arms)
    if not found:
        return ""
    several_runs = len({a.run for a in arms}) > 1
    out = ["## No code-mixed labels\n"]
    for task in sorted({g.arm.task for g in found}):
        mine = [g for g in found if g.arm.task == task]
        ontos = sorted({g.onto for g in mine})
        chosen = [g.arm for g in mine if g.arm.chosen]
        graft_groups = {(g.arm.run, g.arm.group) for g in mine}
        source_arms = [a for a in arms if a.task in ontos and a.chosen]
        ceiling = [
            a for a in arms if a.task == task and a.chosen and (a.run, a.group) not in graft_groups
        ]
        full_ft = {a.run: a for a in source_arms if a.kind.startswith("Full FT")}
        out.append(
            f"### {task}\n\nLabelled data: {', '.join(ontos)} only, and unlabelled code-mixed text "
            f"for CPT. Test macro-F1 on the {task} test split, mean ± sd over seeds (n). λ of "
            f"each graft chosen on mean {task} validation macro-F1 (every λ below); the ceiling "
            f"rows are trained on {task}'s labels. Difference against Full FT on "
            f"{' / '.join(ontos)} alone: paired bootstrap 95% interval and permutation p-value "
            "on the same test examples and seeds.\n"
        )
        out.append("| arm | labels | test macro-F1 | λ | vs Full FT on the labelled task | p |")
        out.append("|---|---|---|---|---|---|")
        rows = [(a, "+".join(ontos) + " + τ_cpt") for a in chosen]
        rows += [(a, a.task) for a in source_arms]
        rows += [(a, f"{task} (ceiling)") for a in ceiling]
        for arm, labels in rows:
            cell = cells.get((arm.run, arm.group, task))
            if cell is None:
                continue
            ref = full_ft.get(arm.run)
            diff = p = ""
            if ref is not None and ref is not arm:
                c = _versus(arm, ref, task, n_resamples, seed)
                if c is not None:
                    d = c.difference
                    diff = f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                    p = f"{c.p_value:.3f}"
            out.append(
                f"| {_label(arm, several_runs)} | {labels} | {_score(cell)} | {_lambda(arm)} "
                f"| {diff} | {p} |"
            )
        out.append("\nEvery λ of each graft (the one chosen on validation marked):\n")
        out.append(f"| arm | λ | validation macro-F1 ({task}) | test macro-F1 | chosen |")
        out.append("|---|---|---|---|---|")
        for g in sorted(mine, key=lambda g: (g.arm.family, g.arm.merge["lambda"])):
            cell = cells.get((g.arm.run, g.arm.group, task))
            val, sd, n = g.arm.val
            test = _score(cell) if cell is not None else "not evaluated"
            out.append(
                f"| {_label(g.arm, several_runs)} | {_lambda(g.arm)} | "
                f"{val:.4f} ± {sd:.4f} (n={n}) | {test} | {'yes' if g.arm.chosen else ''} |"
            )
        out.append("")
    return "\n".join(out) + "\n"
