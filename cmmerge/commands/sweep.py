"""`cmmerge sweep`: one Hydra multirun job = merge -> finetune -> evaluate on the run's shared
CPT and task vector; every job rewrites sweep/summary.csv from the run directory.

Jobs that share a stage compute it once (each stage holds a lock while it runs; the others wait
and find it finished), also when a launcher runs them in parallel processes or on a cluster
(``hydra/launcher=joblib|submitit_local|submitit_slurm|slurm``). A job that fails with a user
error is recorded in ``sweep/failures/`` and listed in the summary; the other jobs go on, and
re-running the sweep redoes only what is missing or failed.

Disk: before the jobs start, :class:`SweepJobs` (a Hydra callback in ``sweep.yaml``) writes the
folders every job of the multirun will use; the job that finishes the last fine-tune made from a
merge deletes its weights unless ``keep_merged=true``. With ``keep_models=false`` a job deletes
its fine-tuned weights once evaluated. A pruned stage a job still needs is made again.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from cmmerge.commands import cpt, evaluate, extract, finetune, merge
from cmmerge.commands.pipeline import prune
from cmmerge.config.ids import stage_dirs
from cmmerge.config.plan import is_done, with_values
from cmmerge.config.specs import finetune_spec, method_name
from cmmerge.config.values import merge_scale, run_dir
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import read_json, write_json_atomic
from cmmerge.reporting.study import chosen_scales
from cmmerge.reporting.tables import finetune_rows, markdown_table, write_csv, write_text_atomic

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
    """sweep/summary.csv and summary.md: every merged arm of the run, the lambda (and density)
    chosen per method on mean validation macro-F1 over seeds (the report's choice,
    :func:`~cmmerge.reporting.study.chosen_scales`; test only reported), and the jobs that
    failed. Written under the sweep's lock."""
    root = run_dir(cfg)
    out = root / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".summary.lock")):
        rows = [r for r in finetune_rows(root) if r["merge_id"]]
        write_csv(rows, out / "summary.csv")
        best = chosen_scales(root)
        text = "# Sweep summary\n\n" + (markdown_table(rows) if rows else "empty\n")
        if best:
            text += (
                "\n## Best by validation macro-F1 (λ and density per method on the mean over "
                "seeds; test only reported)\n\n"
            )
            text += markdown_table([_scales_shown(r) for r in best])
        failures = _failures(cfg)
        if failures:
            text += "\n## Failed jobs (re-run the sweep to retry them)\n\n"
            text += markdown_table(failures, ["job", "error", "at"])
        write_text_atomic(out / "summary.md", text)
    return rows


def _scales_shown(row: dict) -> dict:
    """A chosen-scale row with lambda and density as written on the command line."""
    out = dict(row)
    for key in ("lambda", "density"):
        out[key] = "" if row[key] is None else f"{float(row[key]):g}"
    return out


def _job_name(cfg: DictConfig) -> str:
    """The job's fine-tune id, or for settings that name no folder (a density out of range)
    the raw settings: the job fails with that error and is recorded under this name."""
    try:
        return finetune_spec(cfg).folder_id
    except CmmergeError:
        density = f"-d{cfg.get('density')}" if cfg.get("density") is not None else ""
        return f"{cfg.method.name}-l{cfg['lambda']}{density}-{cfg.task.name}-s{cfg.seed}"


def run(cfg: DictConfig) -> dict:
    with open_dict(cfg):
        cfg.init = "merged"
    job = _job_name(cfg)
    record = run_dir(cfg) / "sweep" / "failures" / f"{job}.json"
    try:
        dirs = stage_dirs(cfg)
        evaluations = [dirs["evaluate"] / t for t in evaluate.eval_task_names(cfg)]
        cpt.run(cfg)
        extract.run(cfg)
        _remake_if_pruned(cfg, merge, dirs["merge"], [dirs["finetune"]])
        merge.run(cfg)
        _remake_if_pruned(cfg, finetune, dirs["finetune"], evaluations)
        ft = finetune.run(cfg)
        ev = evaluate.run(cfg)
        _prune_after(cfg, dirs)
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
    write_summary(cfg)  # the CLI's closing line names it and the best lambda per method
    return {"finetune": ft["metrics"], "evaluate": ev, "job": job}


def _remake_if_pruned(cfg: DictConfig, stage: Any, folder: Path, users: list[Path]) -> None:
    """Make a pruned stage again (force) when a stage of this job that reads it is not done."""
    if transaction.pruned(folder) and not all(is_done(u) for u in users):
        log.info("sweep: %s was pruned after use and this job needs it: making it again", folder)
        stage.run(with_values(cfg, force=True))


JOBS_FILE = "cmmerge_jobs.json"  # in the multirun's folder: every job's merge and fine-tune


def _jobs_file() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(str(HydraConfig.get().sweep.dir)) / JOBS_FILE
    except (ValueError, AttributeError):  # not in a Hydra multirun (tests, sweep.run called)
        return None


def _prune_after(cfg: DictConfig, dirs: dict[str, Path]) -> None:
    """This job's fine-tune (``keep_models=false``), and its merge once every fine-tune of the
    multirun made from it is finished (``keep_merged=false``)."""
    prune(cfg, "finetune", dirs["finetune"])
    path = _jobs_file()
    if path is None or not path.is_file():
        return
    jobs = read_json(path)
    users = [Path(j["finetune"]) for j in jobs if j.get("merge") == str(dirs["merge"])]
    if users and all(is_done(u) for u in users):
        prune(cfg, "merge", dirs["merge"])


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The overrides of every job of the multirun ``config`` (Hydra's basic sweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(params)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


class SweepJobs(Callback):
    """Before a ``cmmerge sweep`` multirun starts: write the merge and fine-tune folders of every
    job into ``<sweep dir>/cmmerge_jobs.json``, so that a job knows when the last fine-tune
    made from a merge is finished."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra import compose

        if str(config.hydra.sweeper.get("_target_", "")).rsplit(".", 1)[-1] != "BasicSweeper":
            return  # another sweeper chooses its jobs as it goes: merges are kept
        jobs = []
        for overrides in job_overrides(config):
            job = compose(config_name=str(config.hydra.job.config_name), overrides=overrides)
            with open_dict(job):
                job.init = "merged"
            name = _job_name(job)
            failure = run_dir(job) / "sweep" / "failures" / f"{name}.json"
            entry: dict[str, Any] = {"job": name, "failure": str(failure)}
            try:
                dirs = stage_dirs(job)
                entry.update(merge=str(dirs["merge"]), finetune=str(dirs["finetune"]))
            except CmmergeError:  # a bad setting: that job fails and records itself
                entry.update(merge=None, finetune=None)
            jobs.append(entry)
        folder = Path(str(config.hydra.sweep.dir))
        write_json_atomic(folder / JOBS_FILE, jobs)
        log.debug("sweep: %d jobs listed in %s", len(jobs), folder / JOBS_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Jobs that a launcher ran in other processes and that failed: into :data:`FAILED`
        (the command's exit status), as jobs run in this process put themselves there."""
        path = Path(str(config.hydra.sweep.dir)) / JOBS_FILE
        if not path.is_file():
            return
        for job in read_json(path):
            if Path(job["failure"]).is_file() and job["job"] not in FAILED:
                FAILED.append(job["job"])
