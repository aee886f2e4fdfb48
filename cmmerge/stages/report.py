"""`cmmerge report [runs=[NAME_OR_DIR,...]]`: the study of one or several run directories.

Writes into ``report/`` of the run: ``report.md`` (one row per fine-tune, then the paper's
table of arms x tasks with mean ± sd over seeds, significance marks and the comparisons with
Full FT and CPT->FT with seed-level statistics, the merge methods against each other (TV->FT vs
TIES->FT), cross-pair transfer, the λ curves, the CPT-length curve, no code-mixed labels),
``report.csv`` (per fine-tune), ``study.csv`` (every number of the study), ``methods.csv`` (the
merge methods compared), ``study.tex`` (booktabs), ``lambda_<task>.png``,
``cpt_length_<task>.png`` and ``transfer.png``.
"""

from __future__ import annotations

from pathlib import Path

from cmmerge.config.specs import ReportSpec
from cmmerge.reporting import cpt_length, curves, methods, no_labels, paper, transfer
from cmmerge.reporting.study import study
from cmmerge.reporting.tables import columns, finetune_rows, markdown_table, write_csv

_PATTERNS = ("finetune/*/", "evaluate/*/*/", "prompt/*/")


def work(spec: ReportSpec, stage_dir: Path) -> dict:
    """Write the report of the runs ``spec`` names into ``stage_dir``."""
    roots = [Path(r) for r in spec.runs]
    arms, cells = study(
        roots, n_resamples=spec.n_resamples, made=spec.made, all_variants=spec.all_variants
    )
    tags = {(a.run, m.folder): a.tag for a in arms for m in a.members}
    rows = [
        _with_variant(row, tags.get((str(root), row["finetune_id"])))
        for root in roots
        for row in _with_run(finetune_rows(root), root, roots)
    ]
    cols = columns(rows)
    table = markdown_table(rows, cols)
    lambdas = curves.plot_lambda(arms, cells, stage_dir)
    lengths = cpt_length.plot(arms, cells, stage_dir)
    heatmap = paper.plot_transfer(arms, cells, stage_dir)
    plots = [*lambdas.values(), *lengths.values(), *([heatmap] if heatmap else [])]
    title = ", ".join(r.name for r in roots)
    n_resamples = spec.n_resamples
    pairs = methods.compare(arms, n_resamples)
    text = (
        f"# cmmerge report: {title}\n\n## The study\n\n"
        + paper.markdown(arms, cells)
        + "\n## Against Full FT and CPT->FT\n\n"
        + paper.comparisons_markdown(arms, cells)
        + _section("Merge methods against each other", methods.markdown(pairs))
        + _section("Cross-pair transfer", transfer.markdown(arms, cells))
        + _section("λ curves", curves.markdown(arms, cells, lambdas))
        + _section("CPT length", cpt_length.markdown(arms, cells, lengths, n_resamples))
        + no_labels.markdown(arms, cells, n_resamples=n_resamples)
        + "\n## Every fine-tune\n\nMacro-F1 (the paper's metric); the validation score "
        "picks the epoch (and λ), the test score is only reported.\n\n"
        + table
        + (f"\n![{heatmap.stem}]({heatmap.name})\n" if heatmap else "")
    )
    (stage_dir / "report.md").write_text(text, encoding="utf-8")
    write_csv(rows, stage_dir / "report.csv", cols)
    paper.write_csv(paper.long_rows(arms, cells), stage_dir / "study.csv")
    (stage_dir / "study.tex").write_text(paper.latex(arms, cells), encoding="utf-8")
    if pairs:
        paper.write_csv(methods.rows(pairs), stage_dir / "methods.csv")
    selections = {
        f"{Path(a.run).name}/{a.family}": a.selection for a in arms if a.chosen and a.selection
    }
    return {
        "metrics": {
            "n_rows": len(rows),
            "n_arms": sum(a.chosen for a in arms),
            "n_arms_shown": sum(a.chosen and a.shown for a in arms),
        },
        "outputs": ["report.md", "report.csv", "study.csv", "study.tex"]
        + (["methods.csv"] if pairs else [])
        + [p.name for p in plots],
        "lambda_selection": selections,
        "table": table,
    }


def _section(title: str, body: str) -> str:
    return f"\n## {title}\n\n{body}" if body else ""


def _with_run(rows: list[dict], root: Path, roots: list[Path]) -> list[dict]:
    if len(roots) == 1:
        return rows
    return [{"run": root.name, **row} for row in rows]


def _with_variant(row: dict, tag: str | None) -> dict:
    """The row with its arm's variant tag after the arm (``Full FT [epochs=2]``)."""
    if not tag:
        return row
    return {k: (f"{v} [{tag}]" if k == "arm" else v) for k, v in row.items()}
