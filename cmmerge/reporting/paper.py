"""Tables of the study in the paper's layout: arms x tasks, mean +- sd over seeds, best in
bold, significance against Full FT and CPT->FT marked; Markdown, CSV and LaTeX (booktabs); the
transfer heatmap. The lambda curves are in :mod:`.curves`, the transfer table in
:mod:`.transfer`, the CPT-length curve in :mod:`.cpt_length`."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from cmmerge.reporting import comparisons
from cmmerge.reporting.comparisons import ALPHA, LATEX_MARKS, MARKS
from cmmerge.reporting.seed_stats import significant
from cmmerge.reporting.study import REFERENCES, Arm, Cell, row_label

_ORDER = {"Full FT": 0, "CPT->FT": 1, "TV->FT": 2, "TIES->FT": 3}


def sort_key(label: str, configured: bool = True) -> tuple:
    """Rows in the paper's order, the configuration's variant of an arm first."""
    return (_ORDER.get(re.split(r" [(\[]", label)[0], 4), re.split(r" \[", label)[0],
            not configured, label)  # fmt: skip


def paper_rows(arms: list[Arm], cells: dict[tuple, Cell]) -> tuple[list[str], list[str], dict]:
    """(row labels, training tasks, {(label, task): (arm, cell)}) of the chosen arms, each on
    its own task's test set; an arm that several run directories hold is shown once per run
    (``CPT->FT [run]``); arms hidden as other variants (:attr:`Arm.shown`) are left out."""
    shown = [(a, cells.get((a.run, a.group, a.task))) for a in arms if a.chosen and a.shown]
    shown = [(a, c) for a, c in shown if c is not None]
    runs: dict[tuple[str, str], set[str]] = {}
    for arm, _ in shown:
        runs.setdefault((row_label(arm), arm.task), set()).add(arm.run)
    table: dict[tuple[str, str], tuple[Arm, Cell]] = {}
    for arm, cell in shown:
        label = row_label(arm)
        if len(runs[(label, arm.task)]) > 1:  # the same arm in several run directories
            label = f"{label} [{Path(arm.run).name}]"
        key = (label, arm.task)
        if key not in table or cell.n > table[key][1].n:
            table[key] = (arm, cell)
    configured = {k[0]: v[0].configured for k, v in table.items()}
    labels = sorted(configured, key=lambda lab: sort_key(lab, configured[lab]))
    tasks = sorted({k[1] for k in table})
    return labels, tasks, table


def _best(table: dict, labels: list[str], task: str) -> str | None:
    scored = [(table[(lab, task)][1].mean, lab) for lab in labels if (lab, task) in table]
    return max(scored)[1] if scored else None


def marks(cell: Cell, symbols: dict[str, str] = MARKS) -> str:
    """The marks of the references ``cell`` beats over seeds (:func:`.comparisons.beats`)."""
    return "".join(symbols[name] for name in REFERENCES if comparisons.beats(cell.versus.get(name)))


def few_seeds_warning(arms: list[Arm], cells: dict[tuple, Cell]) -> str:
    """A warning when comparisons of the table rest on fewer than
    :data:`.comparisons.MIN_SEEDS` seeds."""
    _, _, table = paper_rows(arms, cells)
    counts = [c.n_seeds for _, cell in table.values() for c in cell.versus.values()]
    return comparisons.few_seeds_warning(counts)


def markdown(arms: list[Arm], cells: dict[tuple, Cell]) -> str:
    """The paper's table in Markdown: test macro-F1 mean ± sd (n seeds), best in bold."""
    labels, tasks, table = paper_rows(arms, cells)
    if not labels:
        return "no arm with test results yet\n"
    lines = ["| arm | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    best = {t: _best(table, labels, t) for t in tasks}
    for label in labels:
        row = []
        for task in tasks:
            if (label, task) not in table:
                row.append("")
                continue
            arm, cell = table[(label, task)]
            text = f"{cell.mean:.4f} ± {cell.sd:.4f} (n={cell.n})"
            if label == best[task]:
                text = f"**{text}**"
            row.append(" ".join(filter(None, (text + marks(cell), scale_label(arm)))))
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    note = (
        "\nTest macro-F1, mean ± sd over seeds (n); best per task in bold; "
        f"† / ‡: better than Full FT / CPT->FT with p < {ALPHA} over seeds (the paired test "
        "over per-seed differences, and the two-level bootstrap over seeds and test examples; "
        "the example-level permutation test is a column of the comparisons); λ and density "
        "chosen on mean validation macro-F1.\n"
    )
    return "\n".join(lines) + "\n" + note + few_seeds_warning(arms, cells) + variants_note(arms)


def variants_note(arms: list[Arm]) -> str:
    """What the ``[...]`` tags mean, and the variants left out of the tables."""
    out = ""
    if any(a.tag for a in arms if a.shown):
        out += (
            "\n[...]: the settings in which fine-tunes of the study differ (variants); "
            "comparisons pair only fine-tunes with the same settings apart from the arm itself.\n"
        )
    hidden = sorted({row_label(a) for a in arms if not a.shown and a.chosen}, key=sort_key)
    if hidden:
        out += (
            f"\nMade with other settings than this configuration's, not shown: "
            f"{', '.join(hidden)} (report.all_variants=true shows them).\n"
        )
    return out


def scale_label(arm: Arm) -> str:
    """``λ=0.5 d=0.2`` of a merged arm ("" for any other)."""
    if not arm.merge:
        return ""
    density = arm.merge.get("density")
    return f"λ={arm.merge['lambda']:g}" + (f" d={density:g}" if density is not None else "")


def comparisons_markdown(arms: list[Arm], cells: dict[tuple, Cell]) -> str:
    """Every chosen arm against Full FT and CPT->FT: difference with its interval over seeds
    and test examples (two-level bootstrap), the paired test over seeds, the bootstrap's and
    the example-level permutation test's p-values, and the seeds the comparison rests on."""
    lines = [
        f"| arm | task | test macro-F1 [95% CI] | vs | {comparisons.HEADER} |",
        "|---|---|---|---|" + "---|" * comparisons.N_COLUMNS,
    ]
    labels, tasks, table = paper_rows(arms, cells)
    for label in labels:
        for task in tasks:
            if (label, task) not in table:
                continue
            _, cell = table[(label, task)]
            ci = cell.interval
            score = f"{cell.mean:.4f} [{ci.low:.4f}, {ci.high:.4f}]" if ci else f"{cell.mean:.4f}"
            first = f"| {label} | {task} | {score} |"
            if not cell.versus and not cell.notes:
                lines.append(f"{first} |{comparisons.blank(cell.n)} |")
            for name in REFERENCES:
                c = cell.versus.get(name)
                if c is not None:
                    lines.append(f"{first} {cell.partners[name]} | {comparisons.columns(c)} |")
                elif name in cell.notes:
                    why = f"left out: {cell.notes[name]}"
                    lines.append(f"{first} {name} | {why} | | | | {cell.n} |")
    return "\n".join(lines) + "\n\n" + comparisons.NOTE + "\n"


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"),
                 ("#", r"\#"), ("->", r"$\rightarrow$"), ("λ", r"$\lambda$"),
                 ("τ", r"$\tau$")):  # fmt: skip
        text = text.replace(a, b)
    return text


def latex(arms: list[Arm], cells: dict[tuple, Cell]) -> str:
    """The paper's table as a LaTeX booktabs tabular."""
    labels, tasks, table = paper_rows(arms, cells)
    best = {t: _best(table, labels, t) for t in tasks}
    out = [
        r"\begin{tabular}{l" + "c" * len(tasks) + "}",
        r"\toprule",
        "Arm & " + " & ".join(_latex_escape(t) for t in tasks) + r" \\",
        r"\midrule",
    ]
    for label in labels:
        row = []
        for task in tasks:
            if (label, task) not in table:
                row.append("--")
                continue
            _, cell = table[(label, task)]
            text = f"{cell.mean:.3f} $\\pm$ {cell.sd:.3f}"
            if label == best[task]:
                text = rf"\textbf{{{cell.mean:.3f}}} $\pm$ {cell.sd:.3f}"
            row.append(text + marks(cell, LATEX_MARKS))
        out.append(_latex_escape(label) + " & " + " & ".join(row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def long_rows(arms: list[Arm], cells: dict[tuple, Cell]) -> list[dict]:
    """One CSV row per arm and test task: every number of the study."""
    rows = []
    for arm in arms:
        for (run, group, task), cell in sorted(cells.items()):
            if (run, group) != (arm.run, arm.group):
                continue
            row = {
                "run": Path(run).name,
                "arm": arm.arm,
                "variant": arm.tag,
                "configured": arm.configured,
                "group": group,
                "train_task": arm.task,
                "test_task": task,
                "seeds": " ".join(map(str, arm.seeds)),
                "n": cell.n,
                "val_macro_f1_mean": None if math.isnan(arm.val[0]) else arm.val[0],  # prompts
                "test_macro_f1_mean": cell.mean,
                "test_macro_f1_sd": cell.sd,
                "ci_low": cell.interval.low if cell.interval else None,
                "ci_high": cell.interval.high if cell.interval else None,
                "lambda": (arm.merge or {}).get("lambda"),
                "density": (arm.merge or {}).get("density"),
                "lambda_chosen": arm.chosen if arm.merge else None,
            }
            for name in REFERENCES:
                c = cell.versus.get(name)
                key = name.replace("->", "_").replace(" ", "_").lower()
                row[f"diff_vs_{key}"] = c.difference.estimate if c else None
                row[f"p_vs_{key}"] = c.p_value if c else None  # examples (permutation)
                row.update(_seed_columns(key, c.seeds if c else None))
                row[f"partner_vs_{key}"] = cell.partners.get(name)
                row[f"note_vs_{key}"] = cell.notes.get(name)
            rows.append(row)
    return rows


def _seed_columns(key: str, level) -> dict:
    """The seed-level statistics of one comparison as CSV columns (empty when none)."""
    values = {
        "n_seeds": level.n_seeds if level else None,
        "seed_test": level.test if level else None,
        "seed_p": level.p_value if level else None,
        "seed_p_ttest": level.p_ttest if level else None,
        "seed_p_wilcoxon": level.p_wilcoxon if level else None,
        "seed_diffs": " ".join(f"{d:.6f}" for d in level.differences) if level else None,
        "seed_boot_low": level.interval.low if level else None,
        "seed_boot_high": level.interval.high if level else None,
        "seed_boot_p": level.p_bootstrap if level else None,
        "seed_significant": significant(level, ALPHA) if level else None,
    }
    return {f"{name}_vs_{key}": value for name, value in values.items()}


def write_csv(rows: list[dict], path: Path) -> None:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)


def plot_transfer(arms: list[Arm], cells: dict[tuple, Cell], out_dir: Path) -> Path | None:
    """Heatmap per arm: training task x evaluation task, mean test macro-F1 over seeds."""
    chosen = [a for a in arms if a.chosen and a.shown]
    by_label: dict[str, dict[tuple[str, str], float]] = {}
    for arm in chosen:
        for (run, group, task), cell in cells.items():
            if (run, group) == (arm.run, arm.group):
                by_label.setdefault(row_label(arm), {})[(arm.task, task)] = cell.mean
    by_label = {k: v for k, v in by_label.items() if any(a != b for a, b in v)}
    if not by_label:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(by_label, key=sort_key)
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels) + 1, 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        values = by_label[label]
        train = sorted({a for a, _ in values})
        test = sorted({b for _, b in values})
        grid = [[values.get((a, b), math.nan) for b in test] for a in train]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_xticks(range(len(test)), test, rotation=45, ha="right", fontsize=6)
        ax.set_yticks(range(len(train)), train, fontsize=6)
        ax.set_title(label, fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="test macro-F1")
    path = out_dir / "transfer.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
