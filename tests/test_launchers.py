"""Sweeps through Hydra's launchers (the ``launchers`` extra): real multiruns whose jobs run in
separate processes (submitit_local, joblib), share one CPT, and give the serial sweep's summary;
a failed job is recorded while the others go on, and a re-run redoes only what failed."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose
from small_task import small_task

from cmmerge.io.manifest import read_manifest

# Small and fast: a separable 2-label task of 64 / 32 / 32 rows, 4 CPT steps, one thread per
# job (two jobs share the two cores), no leakage guard over the shipped benchmarks.
SMALL = [
    "train=smoke",
    "cpt.max_steps=4",
    "cpt.batch_size=16",
    "cpt.max_length=32",
    "finetune.epochs=4",
    "finetune.batch_size=8",
    "finetune.max_length=32",
    "evaluate.max_length=32",
    "data.leakage_tasks=[]",
    "lambda=0.5,1.0",
]


def _sweep(root: Path, name: str, task: list[str], *extra: str) -> subprocess.CompletedProcess:
    """``cmmerge sweep`` in a fresh process started from ``root`` (the configs are found as
    package data, and so are the launcher plugins)."""
    return subprocess.run(
        [sys.executable, "-m", "cmmerge.cli", "sweep", f"run.root={root}", f"run.name={name}"]
        + [*SMALL, *task, *extra],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        timeout=600,
    )


def _rows(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "sweep" / "summary.csv").open(encoding="utf-8")))


def _predictions(run: Path) -> dict[str, str]:
    return {
        p.relative_to(run).as_posix(): p.read_text()
        for p in sorted((run / "evaluate").glob("*/*/predictions.jsonl"))
    }


def _stage_folders(parent: Path) -> list[Path]:
    """The stage folders under ``parent`` (not the locks and records beside them)."""
    return [p for p in sorted(parent.iterdir()) if p.is_dir() and not p.name.startswith(".")]


def _job_logs(run: Path) -> list[str]:
    (sweep_dir,) = (run / "logs").glob("sweep-*")  # one multirun, one folder for its jobs
    return [p.read_text() for p in sorted(sweep_dir.glob("job*/*.log"))]


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[Path, list[str]]:
    """The reference: the same sweep, its two jobs one after the other in one process."""
    root = tmp_path_factory.mktemp("launch")
    task = small_task(root / "task", n_train=64, n_eval=32)
    out = _sweep(root, "serial", task, "method=tv")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, task


@pytest.mark.slow  # real multiruns of several processes: `pytest -m slow`
def test_submitit_local_runs_two_processes_sharing_one_cpt(serial):
    root, task = serial
    out = _sweep(root, "par", task, "method=tv", "hydra/launcher=submitit_local")
    assert out.returncode == 0, out.stderr[-3000:]
    run = root / "par"
    (sweep_dir,) = (run / "logs").glob("sweep-*")
    jobs = [d for d in (sweep_dir / ".submitit").iterdir() if d.name.isdigit()]
    assert len(jobs) == 2  # two submitit jobs: two processes (local job id = process id)

    # the same results as the serial sweep, to the last digit of every probability
    assert _rows(run) == _rows(root / "serial") and len(_rows(run)) == 2
    assert _predictions(run) == _predictions(root / "serial")
    assert all(float(r["test_macro_f1"]) > 0.5 for r in _rows(run))  # the task was learned

    # one CPT, made by one job; the other waited on its lock and found it finished
    logs = "".join(_job_logs(run))
    assert logs.count("cpt: running") == 1 and logs.count("cpt: up to date") == 1
    (cpt_dir,) = _stage_folders(run / "cpt")
    assert read_manifest(cpt_dir)["status"] == "finished"

    # each merge was pruned once its fine-tune finished (keep_merged=false), and still counts
    merges = _stage_folders(run / "merge")
    assert len(merges) == 2
    for merge_dir in merges:
        assert not (merge_dir / "model").exists()
        assert json.loads((merge_dir / "pruned.json").read_text())["pruned"] == ["model/"]


@pytest.mark.slow
def test_joblib_failed_jobs_are_recorded_and_a_rerun_redoes_only_them(serial):
    root, task = serial
    # density=1.5 is refused by ties, ignored by task arithmetic: two jobs fail, two succeed
    args = ["method=tv,ties", "density=1.5", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    out = _sweep(root, "jl", task, *args)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "2 job(s) failed" in out.stderr.strip().splitlines()[-1]
    run = root / "jl"
    assert _rows(run) == _rows(root / "serial")  # the two good jobs, as the serial sweep's
    failures = sorted((run / "sweep" / "failures").glob("*.json"))
    assert len(failures) == 2
    assert all("density" in json.loads(f.read_text())["error"] for f in failures)
    assert "Failed jobs" in (run / "sweep" / "summary.md").read_text()

    # the same sweep again (here one job after the other): only the failed jobs are redone
    done = {p: p.read_bytes() for p in run.glob("finetune/*/manifest.json")}
    tried = {f: f.stat().st_mtime_ns for f in failures}
    again = _sweep(root, "jl", task, *args[:2])
    assert again.returncode == 2 and "2 job(s) failed" in again.stderr
    assert {p: p.read_bytes() for p in run.glob("finetune/*/manifest.json")} == done
    logs = "".join(_job_logs_after(run, before=1))
    assert logs.count("finetune: up to date") == 2 and "finetune: running" not in logs
    assert all(f.stat().st_mtime_ns > t for f, t in tried.items())  # the bad jobs ran again


def _job_logs_after(run: Path, before: int) -> list[str]:
    """The job logs of the multiruns after the first ``before`` ones."""
    sweeps = sorted((run / "logs").glob("sweep-*"))[before:]
    return [p.read_text() for d in sweeps for p in sorted(d.glob("job*/*.log"))]


def test_slurm_launcher_config_has_the_cluster_keys():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="cmmerge.configs", version_base="1.3"):
        cfg = hydra_compose(
            config_name="sweep",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1
    assert launcher.timeout_min == 240 and launcher.array_parallelism == 16
    assert cfg.hydra.callbacks.sweep_jobs._target_ == "cmmerge.commands.sweep.SweepJobs"
    assert compose("sweep").keep_merged is False
