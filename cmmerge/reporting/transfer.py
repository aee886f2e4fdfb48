"""The report's "Cross-pair transfer" section: the chosen arms on the test sets of other tasks
(``eval_tasks``, no further training), each against the Full FT and CPT->FT of its training task
on the same test examples and seeds, with the statistics of the paper's table (seed level first,
:mod:`.comparisons`)."""

from __future__ import annotations

from cmmerge.reporting import comparisons
from cmmerge.reporting.paper import marks, sort_key
from cmmerge.reporting.study import REFERENCES, Arm, Cell, row_label


def _transfer_cells(arms: list[Arm], cells: dict[tuple, Cell]) -> list[tuple[Arm, str, Cell]]:
    """(arm, test task, cell) of every shown chosen arm on a task it was not trained on."""
    chosen = sorted((a for a in arms if a.chosen and a.shown), key=lambda a: sort_key(row_label(a)))
    return [
        (arm, task, cell)
        for arm in chosen
        for (run, group, task), cell in sorted(cells.items())
        if (run, group) == (arm.run, arm.group) and task != arm.task
    ]


def markdown(arms: list[Arm], cells: dict[tuple, Cell]) -> str:
    """The section's table ("" without transfer cells): mean ± sd over seeds (n) with the marks
    of the references beaten over seeds, the 95% bootstrap interval, and one row per reference
    with its seed-level and example-level statistics; a warning below the seeds wanted."""
    found = _transfer_cells(arms, cells)
    if not found:
        return ""
    lines = [
        f"| arm | trained on | tested on | test macro-F1 | 95% CI | vs | {comparisons.HEADER} |",
        "|---|---|---|---|---|---|" + "---|" * comparisons.N_COLUMNS,
    ]
    counts = []
    for arm, task, cell in found:
        ci = cell.interval
        interval = f"[{ci.low:.4f}, {ci.high:.4f}]" if ci else ""
        first = (
            f"| {row_label(arm)} | {arm.task} | {task} | {cell.mean:.4f} ± {cell.sd:.4f} "
            f"(n={cell.n}){marks(cell)} | {interval} |"
        )
        versus = [(name, cell.versus[name]) for name in REFERENCES if name in cell.versus]
        if not versus:
            lines.append(f"{first} |{comparisons.blank(cell.n)} |")
        for name, c in versus:
            lines.append(f"{first} {cell.partners[name]} | {comparisons.columns(c)} |")
            counts.append(c.n_seeds)
    note = (
        "\nTest macro-F1 on the other task's test split, mean ± sd over seeds (n); λ as chosen "
        "on the training task's validation split. vs: the Full FT and CPT->FT trained on the "
        f"same task, on the same test examples and seeds; † / ‡: better than them with p < "
        f"{comparisons.ALPHA} over seeds. {comparisons.NOTE}\n"
    )
    return "\n".join(lines) + "\n" + note + comparisons.few_seeds_warning(counts)
