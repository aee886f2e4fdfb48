"""Tables of results read back from a run directory's manifests and metrics files."""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cmmerge.io import transaction
from cmmerge.io.manifest import read_json

log = logging.getLogger("cmmerge")

_ARM_ORDER = {"Full FT": 0, "CPT->FT": 1}


def finetune_rows(run_dir: Path) -> list[dict]:
    """One row per finished fine-tuning run: arm, settings, validation and test metrics.

    Only whole, fresh results are paired: an evaluation made from an earlier version of its
    fine-tune (redone since) is left out of the row and named in its ``stale`` column, as is a
    fine-tune whose starting model changed after it was trained.
    """
    rows = []
    for ft_dir in sorted((run_dir / "finetune").glob("*/")):
        manifest = transaction.finished_manifest(ft_dir)
        if manifest is None:
            continue
        config = manifest.get("config", {})
        row = {
            "arm": manifest.get("arm", ft_dir.name),
            "finetune_id": ft_dir.name,
            "task": manifest.get("task"),
            "seed": config.get("seed"),
            "merge_id": manifest.get("merge_id") or "",
            "val_macro_f1": manifest["metrics"].get("macro_f1"),
        }
        stale = [f"finetune ({Path(p).name} changed)" for p in transaction.stale_inputs(manifest)]
        for eval_dir in sorted((run_dir / "evaluate" / ft_dir.name).glob("*/")):
            evaluation = transaction.finished_manifest(eval_dir)
            if evaluation is None:
                continue
            if transaction.stale_inputs(evaluation):
                stale.append(f"evaluate/{ft_dir.name}/{eval_dir.name}")
                continue
            metrics = read_json(eval_dir / "metrics.json")
            suffix = "" if eval_dir.name == row["task"] else f"[{eval_dir.name}]"
            row[f"test_macro_f1{suffix}"] = metrics["macro_f1"]
            row[f"test_accuracy{suffix}"] = metrics["accuracy"]
        if stale:
            row["stale"] = "; ".join(stale)
            log.warning(
                "report: %s is stale (%s): re-run its stages to report it",
                ft_dir.name,
                row["stale"],
            )
        rows.append(row)
    rows += prompt_rows(run_dir)
    rows.sort(key=lambda r: (_ARM_ORDER.get(r["arm"], 2), r["arm"], str(r["seed"])))
    return rows


def prompt_rows(run_dir: Path) -> list[dict]:
    """One row per finished prompting run (no validation score: nothing is trained)."""
    rows = []
    for stage_dir in sorted((run_dir / "prompt").glob("*/")):
        manifest = transaction.finished_manifest(stage_dir)
        if manifest is None:
            continue
        metrics = manifest["metrics"]
        rows.append(
            {
                "arm": manifest.get("arm", stage_dir.name),
                "finetune_id": stage_dir.name,
                "task": manifest.get("task"),
                "seed": manifest.get("seed"),
                "merge_id": "",
                "val_macro_f1": None,
                "test_macro_f1": metrics["macro_f1"],
                "test_accuracy": metrics["accuracy"],
            }
        )
    return rows


def columns(rows: Sequence[dict]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def write_csv(rows: Sequence[dict], path: Path, cols: Sequence[str] | None = None) -> None:
    """Write ``rows`` as CSV through a private temporary file renamed into place."""
    cols = list(cols or columns(rows))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a private temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], cols: Sequence[str] | None = None) -> str:
    cols = list(cols or columns(rows))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
