"""The report's CPT-length curve: where one run directory holds arms made from CPT variants that
differ in their length only (``cpt.max_steps``, or ``cpt.epochs`` where no step count is set;
``pipeline.cpt_variants``), test macro-F1 of each such arm (CPT->FT, TV->FT, ...) by CPT length,
mean ± sd over seeds, and each length against the shortest one, seeds paired, with the
statistics of the paper's table (seed level first, :mod:`.comparisons`); a table in
``report.md`` and ``cpt_length_<task>.png``.

The settings compared are those :mod:`.variants` reads from the stage manifests, so a CPT that
differs in anything else (its learning rate, corpus) is a curve of its own, never a point."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cmmerge.reporting import comparisons, variants
from cmmerge.reporting.curves import scale
from cmmerge.reporting.paper import sort_key
from cmmerge.reporting.study import Arm, Cell, versus

_LENGTHS = ("max_steps", "epochs")


@dataclass
class Curve:
    """Arms of one name, run and task whose settings differ in their CPT's length only."""

    run: str
    task: str
    kind: str  # the arm's name without its λ (``TV->FT``)
    settings: dict[str, str]  # what the arms share
    points: dict[tuple[str, float], Arm] = field(default_factory=dict)  # length -> arm
    label: str = ""


def _number(value: str | None) -> float | None:
    try:
        return float(json.loads(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def length(settings: dict[str, str]) -> tuple[str, float] | None:
    """(unit, value) of the CPT an arm was made from: its steps where ``max_steps`` is set
    (> 0), else its epochs; None for an arm of no CPT."""
    steps = _number(settings.get("cpt.max_steps"))
    if steps is not None and steps > 0:
        return "steps", steps
    epochs = _number(settings.get("cpt.epochs"))
    return ("epochs", epochs) if epochs is not None and epochs > 0 else None


def _shared(settings: dict[str, str]) -> dict[str, str]:
    """The settings but the CPT's id and length and the λ and density chosen on validation."""
    out = {}
    for key, value in settings.items():
        parts = key.split(".")
        if key == "cpt" or (parts[-1] in _LENGTHS and "cpt" in parts[:-1]):
            continue
        if parts[-1] in ("lambda", "density"):
            continue
        out[key] = value
    return out


def curves(arms: list[Arm]) -> list[Curve]:
    """The curves of two or more CPT lengths among the shown chosen arms (λ as chosen per CPT
    variant); an arm with most seeds stands for a length met twice."""
    found: dict[tuple, Curve] = {}
    for arm in arms:
        point = length(arm.settings) if arm.cpt and arm.chosen and arm.shown else None
        if point is None:
            continue
        shared = _shared(arm.settings)
        kind = variants.strip_lambda(arm.kind)
        key = (arm.run, arm.task, kind, json.dumps(shared, sort_keys=True))
        curve = found.setdefault(key, Curve(arm.run, arm.task, kind, shared))
        if point not in curve.points or len(arm.members) > len(curve.points[point].members):
            curve.points[point] = arm
    out = [c for c in found.values() if len(c.points) > 1]
    for curve in out:  # curves of one name told apart by the settings they differ in
        same = [c for c in out if (c.run, c.task, c.kind) == (curve.run, curve.task, curve.kind)]
        keys = variants.differing([c.settings for c in same])
        tag = variants.tag(curve.settings, keys)
        curve.label = f"{curve.kind} [{tag}]" if tag else curve.kind
    return sorted(out, key=lambda c: (c.run, c.task, sort_key(c.label)))


def _length_text(point: tuple[str, float]) -> str:
    return f"{point[1]:g} {point[0]}"


def _cell(arm: Arm, cells: dict[tuple, Cell]) -> Cell | None:
    return cells.get((arm.run, arm.group, arm.task))


def _table(mine: list[Curve], cells: dict[tuple, Cell]) -> list[str]:
    """Rows: CPT lengths; columns: the curves' test macro-F1 (λ of merges shown)."""
    points = sorted({p for c in mine for p in c.points})
    lines = [
        "| CPT length | CPT | " + " | ".join(c.label for c in mine) + " |",
        "|---|---|" + "---|" * len(mine),
    ]
    for point in points:
        arms = [c.points.get(point) for c in mine]
        ids = sorted({a.cpt for a in arms if a is not None and a.cpt})
        row = []
        for arm in arms:
            cell = _cell(arm, cells) if arm is not None else None
            lam = f" λ={scale(arm)}" if arm is not None and arm.merge else ""
            row.append(f"{cell.mean:.4f} ± {cell.sd:.4f} (n={cell.n}){lam}" if cell else "")
        lines.append(f"| {_length_text(point)} | {', '.join(ids)} | " + " | ".join(row) + " |")
    return lines


def markdown(
    arms: list[Arm], cells: dict[tuple, Cell], plots: dict[tuple[str, str], Path],
    n_resamples: int = 1000, seed: int = 0,
) -> str:  # fmt: skip
    """The section ("" without a curve): per run and task, the table of lengths, each longer
    CPT against the shortest, the plot (``plots``: (run, task) -> PNG) and a warning below the
    seeds wanted."""
    found = curves(arms)
    several_runs = len({c.run for c in found}) > 1
    out = []
    for run, task in sorted({(c.run, c.task) for c in found}):
        mine = [c for c in found if (c.run, c.task) == (run, task)]
        where = f" ({Path(run).name})" if several_runs else ""
        out.append(
            f"### {task}{where}\n\nTest macro-F1 on {task} of the arms made from each CPT, mean ± "
            "sd over seeds (n); the CPTs differ in their length only, λ chosen on validation "
            "per CPT.\n"
        )
        out += _table(mine, cells)
        out.append(
            f"\nEach CPT length against the shortest, same arm, seeds paired:\n\n"
            f"| arm | CPT length | vs | {comparisons.HEADER} |\n"
            "|---|---|---|" + "---|" * comparisons.N_COLUMNS
        )
        counts = []
        for curve in mine:
            points = sorted(curve.points)
            shortest = curve.points[points[0]]
            for point in points[1:]:
                c, why = versus(curve.points[point], shortest, task, n_resamples, seed)
                first = f"| {curve.label} | {_length_text(point)} | {_length_text(points[0])} |"
                if c is None:
                    empty = " |" * (comparisons.N_COLUMNS - 1)
                    out.append(f"{first} left out: {why} |{empty}")
                    continue
                out.append(f"{first} {comparisons.columns(c)} |")
                counts.append(c.n_seeds)
        out.append(f"\n{comparisons.NOTE}\n{comparisons.few_seeds_warning(counts)}")
        if (run, task) in plots:
            out.append(f"![{plots[(run, task)].stem}]({plots[(run, task)].name})\n")
    return "\n".join(out)


def plot(arms: list[Arm], cells: dict[tuple, Cell], out_dir: Path) -> dict[tuple, Path]:
    """Per run and task with a curve: test macro-F1 against CPT length (seed sd as error bars,
    a logarithmic axis where the lengths span a factor of 10) -> ``cpt_length_<task>.png``
    (``cpt_length_<run>_<task>.png`` where several runs have curves)."""
    found = curves(arms)
    if not found:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several_runs = len({c.run for c in found}) > 1
    written = {}
    for run, task in sorted({(c.run, c.task) for c in found}):
        mine = [c for c in found if (c.run, c.task) == (run, task)]
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        units = sorted({p[0] for c in mine for p in c.points})
        for i, curve in enumerate(mine):
            pts = [(p[1], _cell(a, cells)) for p, a in sorted(curve.points.items())]
            pts = [(x, c) for x, c in pts if c is not None and not math.isnan(c.mean)]
            ax.errorbar([x for x, _ in pts], [c.mean for _, c in pts], yerr=[c.sd for _, c in pts],
                        color=f"C{i}", marker="o", capsize=3, label=curve.label)  # fmt: skip
        for ref in (a for a in arms if (a.run, a.task, a.kind) == (run, task, "Full FT")):
            cell = _cell(ref, cells)
            if ref.shown and cell is not None and not math.isnan(cell.mean):
                ax.axhline(cell.mean, color="C7", linestyle=":", label=f"{ref.arm} (no CPT)")
        xs = sorted({p[1] for c in mine for p in c.points})
        if xs[0] > 0 and xs[-1] / xs[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
        ax.minorticks_off()
        ax.set_xlabel(f"CPT length ({' / '.join(units)})")
        ax.set_ylabel(f"test macro-F1 ({task})")
        ax.set_title(f"{task}: test macro-F1 against CPT length (mean ± sd over seeds)", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        name = f"cpt_length_{Path(run).name}_{task}" if several_runs else f"cpt_length_{task}"
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written[(run, task)] = path
    return written
