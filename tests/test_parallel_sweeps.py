"""Two `cmmerge sweep` processes with different, overlapping lambdas started at the same moment
on one run directory: both succeed, CPT and extract are computed once, the shared lambda's
merge, fine-tune and evaluation once, and together they give what one serial sweep over the
union of the lambdas gives, to the last digit (training is bit-deterministic on CPU).

The two-worker case through Hydra's launchers (submitit_local, joblib) is in test_launchers.py;
this is the issue's "two `cmmerge sweep` processes started at once suffice" case."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cmmerge
from small_task import small_task

from cmmerge.io import transaction
from cmmerge.io.manifest import read_manifest

transformers = pytest.importorskip("transformers")

SMALL = [
    "train=smoke",
    "cpt.max_steps=2",
    "cpt.batch_size=16",
    "cpt.max_length=32",
    "finetune.epochs=2",
    "finetune.batch_size=8",
    "finetune.max_length=32",
    "evaluate.max_length=32",
    "data.leakage_tasks=[]",
    "method=tv",
]


def _env() -> dict[str, str]:
    """The test session's environment (its model cache) with one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _argv(root: Path, name: str, task: list[str], lambdas: str) -> list[str]:
    return [
        "sweep",
        f"run.root={root}",
        f"run.name={name}",
        *SMALL,
        *task,
        f"lambda={lambdas}",
    ]


def _rows(run: Path) -> list[dict]:
    rows = csv.DictReader((run / "sweep" / "summary.csv").open(encoding="utf-8"))
    return sorted(rows, key=lambda r: r["finetune_id"])


def _results(run: Path) -> dict[str, bytes]:
    """Every result file of the run's fine-tunes and evaluations, by path in the run: metrics,
    predictions (probabilities to 6 digits) and the fine-tuned weights."""
    out = {}
    for pattern in (
        "finetune/*/metrics.json",
        "finetune/*/model/model.safetensors",
        "evaluate/*/*/metrics.json",
        "evaluate/*/*/predictions.jsonl",
    ):
        for path in sorted(run.glob(pattern)):
            out[path.relative_to(run).as_posix()] = hashlib.sha256(path.read_bytes()).digest()
    return out


def _job_logs(run: Path) -> str:
    return "".join(p.read_text() for p in sorted((run / "logs").glob("sweep-*/job*/*.log")))


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[Path, list[str]]:
    """The reference: one sweep over the union of the lambdas, one job after the other."""
    root = tmp_path_factory.mktemp("sweeps")
    task = small_task(root / "task", n_train=48, n_eval=16)
    # in this process, one thread as the sweeps' processes have
    out = cmmerge(*_argv(root, "serial", task, "0.25,0.5,1.0"), cwd=root, threads=1)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, task


@pytest.mark.slow  # three sweeps of tiny pipelines: `pytest -m slow`
def test_two_sweeps_with_overlapping_lambdas_on_one_run_at_once(serial):
    root, task = serial
    # the second starts with the shared lambda, so both reach it while the other may hold it
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cmmerge.cli", *_argv(root, "par", task, lambdas)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=root,
            env=_env(),
        )
        for lambdas in ("0.25,0.5", "0.5,1.0")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-12000:] for o in outs)
    run = root / "par"
    assert len(list((run / "logs").glob("sweep-*"))) == 2  # one log folder per command

    # every shared stage computed once: the job that ran it logged "running", the others
    # waited on its lock (or came later) and found it finished
    logs = _job_logs(run)
    for stage, runs, skips in (("cpt", 1, 3), ("extract", 1, 3)):
        assert logs.count(f"{stage}: running") == runs, stage
        assert logs.count(f"{stage}: up to date") == skips, stage
    for stage in ("merge", "finetune", "evaluate"):
        ran = re.findall(rf"{stage}: running -> \S*?-l([\d.]+)@", logs)
        assert sorted(ran) == ["0.25", "0.5", "1"], (stage, ran)
        assert len(re.findall(rf"{stage}: up to date in \S*?-l0\.5@", logs)) == 1, stage
    for stage in ("cpt", "extract"):  # one folder each, made by one process, whole
        (folder,) = [p for p in (run / stage).iterdir() if not p.name.startswith(".")]
        assert transaction.problem(folder) is None
        assert (folder / f"{stage}.log").read_text().count(f"{stage}: running") == 1

    # together: exactly what the serial sweep over the union gives
    serial_run = root / "serial"
    assert _rows(run) == _rows(serial_run) and len(_rows(run)) == 3
    assert _results(run) == _results(serial_run) and len(_results(run)) == 12
    for manifest in run.glob("*/**/manifest.json"):
        assert read_manifest(manifest.parent)["status"] == "finished"
    leftovers = [p for p in run.rglob(".*") if p.name.startswith((".partial-", ".old-"))]
    assert leftovers == [] and not (run / "sweep" / "failures").exists()
