"""`cmmerge sweep`: one Hydra multirun job = merge -> finetune -> evaluate on the run's shared
CPT and task vector; every job rewrites sweep/summary.csv from the run directory.

Jobs that share a stage compute it once (each stage holds a lock while it runs; the others wait
and find it finished). A job that fails with a user error is recorded in
``sweep/failures/`` and listed in the summary; the other jobs go on, and re-running the sweep
redoes only what is missing or failed.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

from filelock import FileLock
from omegaconf import DictConfig, open_dict

from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import read_json, write_json_atomic
from cmmerge.reporting.tables import finetune_rows, markdown_table, write_csv, write_text_atomic
from cmmerge.settings import merge_scale, run_dir
from cmmerge.stages import cpt, evaluate, extract, finetune, merge
from cmmerge.stages.ids import finetune_id, method_name

log = logging.getLogger("cmmerge")

FAILED: list[str] = []  # jobs of this process that failed (the CLI's exit status)


def _failures(cfg: DictConfig) -> list[dict]:
    folder = run_dir(cfg) / "sweep" / "failures"
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            out.append(read_json(path))
        except (OSError, ValueError):
            continue
    return out


def write_summary(cfg: DictConfig) -> list[dict]:
    """sweep/summary.csv and summary.md: every merged arm of the run, best lambda per method
    (on validation macro-F1), and the jobs that failed. Written under the sweep's lock."""
    root = run_dir(cfg)
    out = root / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".summary.lock")):
        rows = [r for r in finetune_rows(root) if r["merge_id"]]
        write_csv(rows, out / "summary.csv")
        best = best_by_method(rows)
        text = "# Sweep summary\n\n" + (markdown_table(rows) if rows else "empty\n")
        if best:
            text += "\n## Best by validation macro-F1 (test only reported)\n\n"
            text += markdown_table(list(best.values()))
        failures = _failures(cfg)
        if failures:
            text += "\n## Failed jobs (re-run the sweep to retry them)\n\n"
            text += markdown_table(failures, ["job", "error", "at"])
        write_text_atomic(out / "summary.md", text)
    return rows


def best_by_method(rows: list[dict]) -> dict[str, dict]:
    """The row with the best validation macro-F1 of each merge method."""
    best: dict[str, dict] = {}
    for r in rows:
        method = r["merge_id"].split("-l")[0]
        if r["val_macro_f1"] is not None and (
            method not in best or r["val_macro_f1"] > best[method]["val_macro_f1"]
        ):
            best[method] = r
    return best


def _job_name(cfg: DictConfig) -> str:
    return finetune_id(cfg)


def run(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        cfg.init = "merged"
    job = _job_name(cfg)
    record = run_dir(cfg) / "sweep" / "failures" / f"{job}.json"
    try:
        cpt.run(cfg)
        extract.run(cfg)
        merge.run(cfg)
        ft = finetune.run(cfg)
        ev = evaluate.run(cfg)
    except Exception as err:  # noqa: BLE001 - one job's failure must not end the sweep
        if cfg.get("debug"):
            raise
        if not isinstance(err, CmmergeError):  # our bug: the traceback goes to the log
            log.exception("sweep: job %s failed", job)
        print(f"cmmerge sweep: job {job} failed: {err}", file=sys.stderr)
        write_json_atomic(
            record,
            {
                "job": job,
                "method": method_name(cfg),
                "lambda": merge_scale(cfg),
                "error": str(err),
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
        FAILED.append(job)
        write_summary(cfg)
        return {"failed": str(err), "job": job}
    record.unlink(missing_ok=True)
    rows = write_summary(cfg)
    summary = run_dir(cfg) / "sweep" / "summary.md"
    best = {m: r["merge_id"] for m, r in best_by_method(rows).items()}
    log.info("sweep: job %s done; summary in %s; best so far: %s", job, summary, json.dumps(best))
    return {"finetune": ft["metrics"], "evaluate": ev, "job": job}
