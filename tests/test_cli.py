"""The command: help, Hydra's --help / --cfg, a real multirun, bad input (run in this process
by ``cli.main``), and the wheel, installed and run in a new process from another folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import FAST, cmmerge, compose

from cmmerge.config.ids import stage_dirs
from cmmerge.io.manifest import read_manifest
from cmmerge.stages.registry import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage():
    out = cmmerge("--help")
    assert out.returncode == 0
    for stage in STAGES:
        assert f"  {stage} " in out.stdout


def test_unknown_stage_is_one_line_and_exit_2():
    out = cmmerge("mergee")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "cmmerge: unknown stage 'mergee': did you mean merge? (choose one of: "
        + ", ".join(STAGES)
        + ")"
    ]
    out = cmmerge("xyz")
    assert out.returncode == 2 and "unknown stage 'xyz'; choose one of: " in out.stderr


def test_stage_help_and_cfg_job(tmp_path):
    out = cmmerge("merge", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "model: " in out.stdout and "tiny-llama" in out.stdout
    # the shared keys with their defaults and what they do (cmmerge/config/keys.py)
    assert "density = 0.2: merge: fraction of each task vector kept by ties" in out.stdout
    assert "cache_dir = null: built tiny models; null = $CMMERGE_CACHE" in out.stdout
    out = cmmerge("cpt", "model=tiny-llama", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "name: tiny-llama" in out.stdout and "cpt:" in out.stdout
    assert not (tmp_path / "runs").exists()  # --cfg runs nothing


def test_sweep_is_a_real_multirun_with_one_shared_cpt(tmp_path):
    out = cmmerge(
        "sweep", "lambda=0.5,1.0", "method=tv,ties", f"run.root={tmp_path}", "run.name=sw", *FAST
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "sw"
    rows = list(csv.DictReader((run / "sweep" / "summary.csv").open()))
    cpt_dir = stage_dirs(compose("sweep", [f"run.root={tmp_path}", "run.name=sw", *FAST]))["cpt"]
    assert sorted(r["merge_id"] for r in rows) == [
        f"{m}@{cpt_dir.name}"
        for m in ("task_arithmetic-l0.5", "task_arithmetic-l1", "ties-l0.5-d0.2", "ties-l1-d0.2")
    ]
    assert all(0 <= float(r["test_macro_f1"]) <= 1 for r in rows)
    assert "Best by validation macro-F1" in (run / "sweep" / "summary.md").read_text()
    assert len(list((run / "logs").glob("sweep-*/job*"))) == 4
    assert (run / "logs").glob("sweep-*/multirun.yaml")
    # CPT ran once and the later jobs reused it
    cpt = read_manifest(cpt_dir)
    assert cpt is not None and "running -> " in "".join(
        p.read_text() for p in (run / "logs").glob("sweep-*/job0/*.log")
    )
    later = "".join(p.read_text() for p in (run / "logs").glob("sweep-*/job3/*.log"))
    assert "cpt: up to date" in later and "cpt: running" not in later


def _assert_one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in lines[0]


def test_bad_inputs_exit_2_with_one_line_and_no_manifest(tmp_path):
    run = ["run.root=" + str(tmp_path), "run.name=bad"]
    out = cmmerge("cpt", "model.name_or_path=/no/such/model", *run)
    _assert_one_line_error(out, "/no/such/model")
    assert not list((tmp_path / "bad" / "cpt").rglob("manifest.json"))

    out = cmmerge("merge", "density=1.5", *run)
    _assert_one_line_error(out, "density", "1.5")
    out = cmmerge("merge", "density=0", *run)
    _assert_one_line_error(out, "density")
    assert not (tmp_path / "bad" / "merge").exists()

    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()
    out = cmmerge("data", f"data.root={empty_root}", *run)
    _assert_one_line_error(out, "sentimix_hinglish")
    assert read_manifest(tmp_path / "bad" / "data") is None

    corpus_root = tmp_path / "corpus_root"
    (corpus_root / "hinglish_unlabeled" / "l3cube_hinglid").mkdir(parents=True)
    (corpus_root / "hinglish_unlabeled" / "l3cube_hinglid" / "test.txt").write_text("")
    out = cmmerge(
        "cpt",
        f"data.root={corpus_root}",
        "corpus.task_train_sets=[]",
        "data.leakage_tasks=[]",
        "task.test=../x",
        *run,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not list((tmp_path / "bad" / "cpt").rglob("manifest.json"))

    out = cmmerge("extract", *run)  # no CPT in this run: says which command makes it
    _assert_one_line_error(out, "cmmerge cpt")


def test_debug_true_shows_the_traceback(tmp_path):
    out = cmmerge("merge", "density=1.5", "debug=true", f"run.root={tmp_path}")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_wheel_ships_configs_and_samples_and_runs_from_another_folder(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("cmmerge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cmmerge/configs/pipeline.yaml" in names
    assert "cmmerge/configs/model/tiny-xlmr.yaml" in names
    assert any(n.startswith("cmmerge/samples/sentimix_hinglish/") for n in names)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, cmmerge; assert cmmerge.__file__.startswith(sys.argv[1]), "
        "cmmerge.__file__; from cmmerge.cli import main; sys.argv = sys.argv[:1]; "
        "main(['data', '--cfg', 'job'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": str(site)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "sentiment-en-hi" in out.stdout


def test_data_stage_from_the_command_line(tmp_path):
    out = cmmerge("data", f"run.root={tmp_path}", "run.name=d", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    stats = json.loads((tmp_path / "d" / "data" / "stats.json").read_text())
    assert stats["task"]["sizes"]["train"] == 1500


def test_the_program_exits_as_the_interpreter_would():
    """`cmmerge` ends with os._exit after the exit handlers (cli.command): the threading exit
    callbacks run first, where joblib's loky executor stops its worker processes, which
    multiprocessing's atexit handler then joins (without them a sweep on the joblib launcher
    waited forever); a process that has nothing left to do ends at once."""
    code = (
        "import sys, threading\n"
        "from joblib.externals.loky import get_reusable_executor\n"
        "from cmmerge import cli\n"
        "assert get_reusable_executor(max_workers=1).submit(int, '7').result() == 7\n"
        "threading._register_atexit(lambda: print('threading callbacks ran', flush=True))\n"
        "sys.argv = ['cmmerge', '--help']\n"
        "cli.command()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "threading callbacks ran" in proc.stdout and "cmmerge merge" in proc.stdout
