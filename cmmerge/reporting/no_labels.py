"""The report's "No code-mixed labels" section: grafts (``cmmerge graft``: the base fine-tuned
on a task in one language, e.g. English, plus lambda * tau_cpt, not trained further) on the
code-mixed test set, beside the models fine-tuned on that labelled task alone (Full FT and
CPT->FT on English, a transfer cell) and, as the ceiling, the arms trained with code-mixed
labels; then every lambda of each graft with its validation and test scores.

Reads the arms and cells of :mod:`cmmerge.reporting.study` (lambda chosen there on mean
validation macro-F1, never test) and the graft manifests for what each graft was made from;
each row is compared with Full FT on the labelled task with the statistics of the paper's table
(seed level first, :mod:`.comparisons`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmmerge.io.manifest import read_manifest
from cmmerge.reporting import comparisons
from cmmerge.reporting.curves import families, lambda_table, scale
from cmmerge.reporting.study import Arm, Cell, row_label, versus


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


def _label(arm: Arm, several_runs: bool) -> str:
    label = row_label(arm)
    return f"{label} ({Path(arm.run).name})" if several_runs else label


def _score(cell: Cell) -> str:
    return f"{cell.mean:.4f} ± {cell.sd:.4f} (n={cell.n})"


def markdown(
    arms: list[Arm], cells: dict[tuple, Cell], n_resamples: int = 1000, seed: int = 0
) -> str:
    """The section as Markdown ("" when the study has no graft)."""
    found = grafts(arms)
    if not found:
        return ""
    several_runs = len({a.run for a in arms}) > 1
    out = ["\n## No code-mixed labels\n"]
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
            f"rows are trained on {task}'s labels. vs: Full FT on {' / '.join(ontos)} alone, on "
            f"the same test examples and seeds; †: better than it with p < {comparisons.ALPHA} "
            "over seeds.\n"
        )
        out.append(f"| arm | labels | test macro-F1 | λ | vs | {comparisons.HEADER} |")
        out.append("|---|---|---|---|---|" + "---|" * comparisons.N_COLUMNS)
        rows = [(a, "+".join(ontos) + " + τ_cpt") for a in chosen]
        rows += [(a, a.task) for a in source_arms]
        rows += [(a, f"{task} (ceiling)") for a in ceiling]
        counts = []
        for arm, labels in rows:
            cell = cells.get((arm.run, arm.group, task))
            if cell is None:
                continue
            ref = full_ft.get(arm.run)
            c = None
            if ref is not None and ref is not arm:
                c, _ = versus(arm, ref, task, n_resamples, seed)
            first = f"| {_label(arm, several_runs)} | {labels} | {_score(cell)}"
            first += (
                f"{comparisons.MARKS['Full FT'] if comparisons.beats(c) else ''} | {scale(arm)}"
            )
            if c is None:
                out.append(f"{first} | |{comparisons.blank(cell.n)} |")
                continue
            out.append(f"{first} | {_label(ref, several_runs)} | {comparisons.columns(c)} |")
            counts.append(c.n_seeds)
        out.append(f"\n{comparisons.NOTE}\n{comparisons.few_seeds_warning(counts)}")
        out.append("Every λ of each graft (the one chosen on validation marked):\n")
        out.append(lambda_table(families([g.arm for g in mine], task, False), cells, task))
        out.append("")
    return "\n".join(out) + "\n"
