"""`cmmerge sweep`: one Hydra multirun job = merge -> finetune -> evaluate on the run's shared
CPT and task vector; every job rewrites sweep/summary.csv from the run directory."""

from __future__ import annotations

from omegaconf import DictConfig, open_dict

from cmmerge.reporting.tables import finetune_rows, markdown_table, write_csv
from cmmerge.settings import run_dir
from cmmerge.stages import cpt, evaluate, extract, finetune, merge


def write_summary(cfg: DictConfig) -> list[dict]:
    """sweep/summary.csv and summary.md: every merged arm of the run, best lambda per method."""
    root = run_dir(cfg)
    rows = [r for r in finetune_rows(root) if r["merge_id"]]
    out = root / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "summary.csv")
    best: dict[str, dict] = {}
    for r in rows:
        method = r["merge_id"].split("-l")[0]
        if r["val_macro_f1"] is not None and (
            method not in best or r["val_macro_f1"] > best[method]["val_macro_f1"]
        ):
            best[method] = r
    text = "# Sweep summary\n\n" + markdown_table(rows) if rows else "# Sweep summary\n\nempty\n"
    if best:
        text += "\n## Best by validation macro-F1 (test only reported)\n\n" + markdown_table(
            list(best.values())
        )
    (out / "summary.md").write_text(text, encoding="utf-8")
    return rows


def run(cfg: DictConfig) -> dict:
    cpt.run(cfg)
    extract.run(cfg)
    merge.run(cfg)
    with open_dict(cfg):
        cfg.init = "merged"
    ft = finetune.run(cfg)
    ev = evaluate.run(cfg)
    write_summary(cfg)
    return {"finetune": ft["metrics"], "evaluate": ev}
