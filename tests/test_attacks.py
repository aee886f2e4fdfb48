"""Attacks on real stages through the command line: SIGKILL at random moments of a merge, two
merges of one folder at once, a write failure under `ulimit -f`, and damaged inputs. After each,
nothing that looks finished is left, and the same command completes with the same result."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import xlmr_pair

from cmmerge.io import transaction
from cmmerge.io.manifest import read_manifest

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return xlmr_pair(
        tmp_path_factory.mktemp("attack"), vocab=3000, hidden=64, layers=4, intermediate=256
    )


def _args(models, out, *extra):
    return [
        sys.executable,
        "-m",
        "cmmerge.cli",
        "merge",
        f"base={models / 'base'}",
        f"models=[{models / 'tuned'}]",
        "method=ties",
        "lambda=0.5",
        "density=0.3",
        f"output={out}",
        f"run.root={out.parent / 'runs'}",
        "max_shard_size=200KB",
        *extra,
    ]


def _weights_digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "merged"
    subprocess.run(_args(models, out), check=True, capture_output=True)
    return _weights_digest(out)


def _looks_finished_but_is_not(out) -> bool:
    return read_manifest(out) is not None and transaction.problem(out) is not None


@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5, 2.0, 2.5, 3.5])
def test_killed_merge_then_the_same_command_completes(models, reference, tmp_path, delay):
    out = tmp_path / "merged"
    proc = subprocess.Popen(
        _args(models, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not _looks_finished_but_is_not(out)
    if read_manifest(out) is None:  # killed before the end: nothing in place
        assert not out.exists()
    done = subprocess.run(_args(models, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert transaction.problem(out) is None
    assert _weights_digest(out) == reference
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == [
        ".merged.lock"
    ]


def test_two_identical_merges_at_once_both_succeed_and_merge_once(models, reference, tmp_path):
    out = tmp_path / "merged"
    procs = [
        subprocess.Popen(
            _args(models, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("up to date" in e for e in errs) == 1  # the second waited and found it done
    assert _weights_digest(out) == reference


def test_write_failure_is_one_line_and_leaves_nothing(models, reference, tmp_path):
    out = tmp_path / "merged"
    command = " ".join(f"'{a}'" for a in _args(models, out))
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 200; exec {command}"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] or "file size" in lines[0], lines[0]
    assert not out.exists() and not transaction.partial_dir(out).exists()
    done = subprocess.run(_args(models, out), capture_output=True, text=True)
    assert done.returncode == 0 and _weights_digest(out) == reference


def test_deleted_shard_is_redone_not_skipped(models, reference, tmp_path):
    out = tmp_path / "merged"
    subprocess.run(_args(models, out), check=True, capture_output=True)
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    proc = subprocess.run(_args(models, out), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout + proc.stderr and shard.exists()
    assert _weights_digest(out) == reference


def test_source_rewritten_in_place_at_the_same_size_redoes_the_merge(models, tmp_path):
    src = tmp_path / "tuned"
    subprocess.run(["cp", "-r", str(models / "tuned"), str(src)], check=True)
    out = tmp_path / "merged"
    args = [a if not a.startswith("models=") else f"models=[{src}]" for a in _args(models, out)]
    subprocess.run(args, check=True, capture_output=True)
    first = _weights_digest(out)
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, other values
    time.sleep(0.01)
    weights.write_bytes(bytes(data))
    os.utime(weights)
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout + proc.stderr and _weights_digest(out) != first
