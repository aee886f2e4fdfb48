"""`cmmerge report [runs=[NAME_OR_DIR,...]]`: the study of one or several run directories.

Writes into ``report/`` of the run: ``report.md`` (one row per fine-tune, then the paper's
table of arms x tasks with mean ± sd over seeds, significance marks and the comparisons with
Full FT and CPT->FT with seed-level statistics, cross-pair transfer, the λ curves, the CPT-length
curve, no code-mixed labels), ``report.csv`` (per fine-tune), ``study.csv`` (every number of the
study), ``study.tex`` (booktabs), ``lambda_<task>.png``, ``cpt_length_<task>.png`` and
``transfer.png``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import manifest_hash
from cmmerge.reporting import cpt_length, curves, no_labels, paper, transfer, variants
from cmmerge.reporting.study import study
from cmmerge.reporting.tables import columns, finetune_rows, markdown_table, write_csv
from cmmerge.settings import config_bool, plain, run_dir
from cmmerge.stages.runner import RunContext, run_stage
from cmmerge.stages.spec import CptSpec, finetune_spec

_PATTERNS = ("finetune/*/", "evaluate/*/*/", "prompt/*/")


def configured(cfg: DictConfig) -> variants.Configured:
    """The fine-tune settings a configuration makes (its own view, its evaluation's), and the
    settings of each CPT variant it makes (``cpt.*``; ``pipeline.cpt_variants`` give several)."""
    own = variants.view_settings(finetune_spec(cfg).settings_view())
    if cfg.get("evaluate") is not None:
        variants.flatten(plain(cfg.evaluate), "evaluate", own)
    cpts = []
    for variant in plain((cfg.get("pipeline") or {}).get("cpt_variants")) or [None]:
        vcfg = cfg.copy()
        if variant:
            with open_dict(vcfg):
                vcfg.cpt = OmegaConf.merge(vcfg.cpt, variant)
        view = CptSpec.from_config(vcfg).config_view()
        settings = variants.view_settings(view, "cpt", "cpt")
        cpts.append({k: v for k, v in settings.items() if k.split(".")[0] == "cpt"})
    return variants.Configured(str(cfg.task.name), own, cpts)


def report_runs(cfg: DictConfig) -> list[Path]:
    """The run directories reported: ``runs=[...]`` (names under run.root, or folders), else
    the configured run."""
    names = cfg.get("runs") or [str(cfg.run.name)]
    out = []
    for name in names:
        path = Path(str(name)).expanduser()
        path = path if path.is_dir() else Path(str(cfg.run.root)).expanduser() / str(name)
        if not path.is_dir():
            raise CmmergeError(
                f"run directory {path} does not exist (run.root={cfg.run.root}, run {name})"
            )
        out.append(path)
    return out


def run(cfg: DictConfig) -> dict:
    roots = report_runs(cfg)
    finished = sorted(
        p
        for root in roots
        for pat in _PATTERNS
        for p in root.glob(pat)
        if transaction.finished_manifest(p)
    )
    inputs = [{"path": str(p), "manifest_sha256": manifest_hash(p)} for p in finished]
    if not inputs:
        where = ", ".join(map(str, roots))
        raise CmmergeError(f"nothing to report in {where}: no finished finetune or prompt stage")
    options = cfg.get("report") or {}
    n_resamples = int(options.get("n_resamples", 1000))
    # a report over several runs shows all their variants (the runs named are the selection)
    all_variants = len(roots) > 1 or (
        OmegaConf.select(cfg, "report.all_variants") is not None
        and config_bool(cfg, "report.all_variants")
    )
    made = configured(cfg)
    config_view = {"runs": [str(r) for r in roots], "n_resamples": n_resamples}
    # the variants the configuration makes first (or only): part of what the report shows
    config_view["variants"] = {"all": all_variants, "finetune": made.own, "cpt": made.cpts}

    def work(stage_dir):
        arms, cells = study(roots, n_resamples=n_resamples, made=made, all_variants=all_variants)
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
        text = (
            f"# cmmerge report: {title}\n\n## The study\n\n"
            + paper.markdown(arms, cells)
            + "\n## Against Full FT and CPT->FT\n\n"
            + paper.comparisons_markdown(arms, cells)
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
            + [p.name for p in plots],
            "lambda_selection": selections,
            "table": table,
        }

    out = run_dir(cfg) / "report"
    manifest = run_stage(RunContext.of(cfg), "report", out, config_view, inputs, work)
    print((out / "report.md").read_text(encoding="utf-8"))
    return manifest


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
