"""`cmmerge report`: arms x metrics (validation and test macro-F1) of a run directory, as
Markdown and CSV in report/."""

from __future__ import annotations

from omegaconf import DictConfig

from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import manifest_hash
from cmmerge.reporting.tables import columns, finetune_rows, markdown_table, write_csv
from cmmerge.settings import run_dir
from cmmerge.stages.runner import run_stage


def run(cfg: DictConfig) -> dict:
    root = run_dir(cfg)
    if not root.is_dir():
        raise CmmergeError(
            f"run directory {root} does not exist (run.root={cfg.run.root}, "
            f"run.name={cfg.run.name})"
        )
    patterns = ("finetune/*/", "evaluate/*/*/", "prompt/*/")
    finished = sorted(
        p for pat in patterns for p in root.glob(pat) if transaction.finished_manifest(p)
    )
    inputs = [{"path": str(p), "manifest_sha256": manifest_hash(p)} for p in finished]
    if not inputs:
        raise CmmergeError(f"nothing to report in {root}: no finished finetune or prompt stage")

    def work(stage_dir):
        rows = finetune_rows(root)
        cols = columns(rows)
        table = markdown_table(rows, cols)
        (stage_dir / "report.md").write_text(
            f"# cmmerge report: {root.name}\n\nMacro-F1 (the paper's metric); the validation "
            "score picks the epoch, the test score is only reported.\n\n" + table,
            encoding="utf-8",
        )
        write_csv(rows, stage_dir / "report.csv", cols)
        return {
            "metrics": {"n_rows": len(rows)},
            "outputs": ["report.md", "report.csv"],
            "table": table,
        }

    manifest = run_stage(cfg, "report", root / "report", {"run": str(root)}, inputs, work)
    print((root / "report" / "report.md").read_text(encoding="utf-8"))
    return manifest
