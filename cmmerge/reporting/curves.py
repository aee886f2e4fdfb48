"""The report's λ curves: per training task and merge family (one merge method with its
settings, in one run directory), validation and test macro-F1 (mean ± sd over seeds) at every
λ (and density), the λ chosen on mean validation macro-F1 (:func:`.study.select_scales`, never
test) marked; a table in ``report.md`` and ``lambda_<task>.png``."""

from __future__ import annotations

import math
from pathlib import Path

from cmmerge.reporting.paper import sort_key
from cmmerge.reporting.study import REFERENCES, Arm, Cell, row_label


def scale(arm: Arm) -> str:
    """The merge's λ (and density): ``0.5`` or ``0.5 (d=0.2)``; "" for an arm of no merge."""
    if not arm.merge:
        return ""
    density = arm.merge.get("density")
    return f"{arm.merge['lambda']:g}" + (f" (d={density:g})" if density is not None else "")


def families(arms: list[Arm], task: str, shown_only: bool = True) -> list[tuple[str, list[Arm]]]:
    """The (shown) merge families trained on ``task``, in the paper's order: (row label, its
    arms by λ and density); the label names the run where several runs hold it."""
    found: dict[tuple[str, str], list[Arm]] = {}
    for arm in arms:
        if arm.task == task and arm.merge is not None and (arm.shown or not shown_only):
            found.setdefault((arm.run, arm.family), []).append(arm)
    labels = {key: row_label(next((a for a in m if a.chosen), m[0])) for key, m in found.items()}
    runs: dict[str, set[str]] = {}
    for (run, _), label in labels.items():
        runs.setdefault(label, set()).add(run)
    out = []
    for key, members in found.items():
        label = labels[key]
        if len(runs[label]) > 1:
            label = f"{label} [{Path(key[0]).name}]"
        members.sort(key=lambda a: (a.merge["lambda"], a.merge.get("density") or 0))
        out.append((label, members))
    return sorted(out, key=lambda item: sort_key(item[0]))


def _score(cell: Cell | None) -> str:
    return f"{cell.mean:.4f} ± {cell.sd:.4f} (n={cell.n})" if cell else "not evaluated"


def lambda_table(found: list[tuple[str, list[Arm]]], cells: dict[tuple, Cell], task: str) -> str:
    """Every λ of the families ``found``: validation and test macro-F1 on ``task`` (mean ± sd
    over seeds, n), the one chosen on validation marked."""
    lines = ["| arm | λ | validation macro-F1 | test macro-F1 | chosen |", "|---|---|---|---|---|"]
    for label, members in found:
        for arm in members:
            val, sd, n = arm.val
            cell = cells.get((arm.run, arm.group, task))
            lines.append(
                f"| {label} | {scale(arm)} | {val:.4f} ± {sd:.4f} (n={n}) | {_score(cell)} | "
                f"{'yes' if arm.chosen else ''} |"
            )
    return "\n".join(lines) + "\n"


def markdown(arms: list[Arm], cells: dict[tuple, Cell], plots: dict[str, Path]) -> str:
    """The section: per training task with a merge family of two or more λ, the table and its
    plot (``plots``: task -> PNG); "" when there is none."""
    out = []
    for task in sorted({a.task for a in arms}):
        found = [f for f in families(arms, task) if len(f[1]) > 1]
        if not found:
            continue
        out.append(
            f"### {task}\n\nMacro-F1 on {task}'s validation and test splits at every λ, mean ± sd "
            "over seeds (n); λ (and density) chosen per merge method on mean validation "
            "macro-F1 (chosen: yes; a ring in the plot), never on test.\n"
        )
        out.append(lambda_table(found, cells, task))
        if task in plots:
            out.append(f"![{plots[task].stem}]({plots[task].name})\n")
    return "\n".join(out)


def _curve(ax, arms: list[Arm], cells: dict[tuple, Cell], task: str, label: str, color: str):
    """One family's validation (dashed) and test (solid) curves, the chosen λ ringed."""
    xs = [a.merge["lambda"] for a in arms]
    val = [a.val for a in arms]
    ax.errorbar(xs, [v[0] for v in val], yerr=[v[1] for v in val], color=color, linestyle="--",
                marker="o", capsize=3, label=f"{label} (validation)")  # fmt: skip
    test = [(a, cells.get((a.run, a.group, task))) for a in arms]
    test = [(a, c) for a, c in test if c is not None]
    if test:
        ax.errorbar([a.merge["lambda"] for a, _ in test], [c.mean for _, c in test],
                    yerr=[c.sd for _, c in test], color=color, marker="s", capsize=3,
                    label=f"{label} (test)")  # fmt: skip
    for arm in arms:
        if not arm.chosen:
            continue
        ys = [arm.val[0]] + [c.mean for a, c in test if a is arm]
        ax.plot([arm.merge["lambda"]] * len(ys), ys, linestyle="none", marker="o", ms=13,
                mfc="none", mec=color, mew=1.5)  # fmt: skip


def plot_lambda(arms: list[Arm], cells: dict[tuple, Cell], out_dir: Path) -> dict[str, Path]:
    """Per training task with a family of two or more λ: validation and test macro-F1 against
    λ (seed sd as error bars; a curve per density where a family has several), the chosen λ
    ringed, Full FT and CPT->FT test means as reference lines -> ``lambda_<task>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    written = {}
    for task in sorted({a.task for a in arms}):
        found = [f for f in families(arms, task) if len(f[1]) > 1]
        if not found:
            continue
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        curves = []
        for label, members in found:
            densities = sorted({a.merge.get("density") or 0 for a in members})
            for d in densities:
                mine = [a for a in members if (a.merge.get("density") or 0) == d]
                curves.append((f"{label} d={d:g}" if len(densities) > 1 else label, mine))
        for i, (label, members) in enumerate(curves):
            _curve(ax, members, cells, task, label, f"C{i}")
        handles = [Line2D([], [], linestyle="none", marker="o", ms=10, mfc="none", mec="k",
                          label="λ chosen on validation")]  # fmt: skip
        refs = [
            a for name in REFERENCES for a in arms if a.kind == name and a.task == task and a.shown
        ]
        several_runs = len({a.run for a in refs}) > 1
        for j, ref in enumerate(sorted(refs, key=lambda a: (sort_key(a.arm), a.run))):
            cell = cells.get((ref.run, ref.group, task))
            if cell is not None and not math.isnan(cell.mean):
                where = f", {Path(ref.run).name}" if several_runs else ""
                color = f"C{7 + j}" if j < 3 else f"C{j}"
                ax.axhline(cell.mean, color=color, linestyle=":", label=f"{ref.arm} (test{where})")
        ax.set_xlabel("λ")
        ax.set_ylabel("macro-F1")
        ax.set_title(f"{task}: macro-F1 against λ (mean ± sd over seeds)", fontsize=9)
        ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=6)
        fig.tight_layout()
        path = out_dir / f"lambda_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[task] = path
    return written
