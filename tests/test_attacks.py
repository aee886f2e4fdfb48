"""Attacks on real stages through the command line: SIGKILL at random moments of a merge, a
fine-tune and an evaluation (by time, and the moment a given file appears in the partial
folder), two merges of one folder at once, a write failure under `ulimit -f`, and damaged
inputs. After each, nothing that looks finished is left, and the same command completes with
the same result as an uninterrupted run.

What is attacked runs in its own process; the references and the re-runs run in this one (one
thread, as the attacked processes). One kill point per stage is in the default tier, the others
are marked slow (`pytest -m slow`)."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import cmmerge, compose, xlmr_pair
from small_task import rows, small_task, write_csv

from cmmerge.commands import evaluate, status
from cmmerge.config.ids import stage_dirs
from cmmerge.errors import CmmergeError
from cmmerge.io import transaction
from cmmerge.io.manifest import read_manifest

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return xlmr_pair(
        tmp_path_factory.mktemp("attack"), vocab=3000, hidden=64, layers=4, intermediate=256
    )


def _args(models, out, *extra):
    """The arguments of the standalone merge into ``out``."""
    return [
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


def _process(args):
    """The command line of ``cmmerge *args`` in a new Python process."""
    return [sys.executable, "-m", "cmmerge.cli", *args]


def _here(args):
    """``cmmerge *args`` in this process with one thread, as the attacked processes have
    (OMP_NUM_THREADS=1): re-runs give the bits of the reference."""
    return cmmerge(*args, threads=1)


def _weights_digest(folder):
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "merged"
    done = _here(_args(models, out))
    assert done.returncode == 0, done.stderr
    return _weights_digest(out)


def _looks_finished_but_is_not(out) -> bool:
    return read_manifest(out) is not None and transaction.problem(out) is not None


@pytest.mark.parametrize(
    "when",
    [
        *(
            pytest.param(f"after:{delay}", marks=pytest.mark.slow)
            for delay in (0.5, 1.0, 1.5, 2.0, 2.5, 3.5)
        ),
        "*.safetensors",  # the first shard of the merged weights is being written
    ],
)
def test_killed_merge_then_the_same_command_completes(models, reference, tmp_path, when):
    out = tmp_path / "merged"
    killed = _killed(_process(_args(models, out)), _trigger(when, transaction.partial_dir(out)))
    assert not _looks_finished_but_is_not(out)
    if read_manifest(out) is None:  # killed before the end: nothing in place
        assert killed and not out.exists()
    done = _here(_args(models, out))
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
            _process(_args(models, out)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum("up to date" in e for e in errs) == 1  # the second waited and found it done
    assert _weights_digest(out) == reference


def test_write_failure_is_one_line_and_leaves_nothing(models, reference, tmp_path):
    out = tmp_path / "merged"
    command = " ".join(f"'{a}'" for a in _process(_args(models, out)))
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 200; exec {command}"], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] or "file size" in lines[0], lines[0]
    assert not out.exists() and not transaction.partial_dir(out).exists()
    done = _here(_args(models, out))
    assert done.returncode == 0 and _weights_digest(out) == reference


def test_deleted_shard_is_redone_not_skipped(models, reference, tmp_path):
    out = tmp_path / "merged"
    assert _here(_args(models, out)).returncode == 0
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    proc = _here(_args(models, out))
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout + proc.stderr and shard.exists()
    assert _weights_digest(out) == reference


def test_source_rewritten_in_place_at_the_same_size_redoes_the_merge(models, tmp_path):
    src = tmp_path / "tuned"
    shutil.copytree(models / "tuned", src)
    out = tmp_path / "merged"
    args = [a if not a.startswith("models=") else f"models=[{src}]" for a in _args(models, out)]
    assert _here(args).returncode == 0
    first = _weights_digest(out)
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, other values
    time.sleep(0.01)
    weights.write_bytes(bytes(data))
    os.utime(weights)
    proc = _here(args)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" not in proc.stdout + proc.stderr and _weights_digest(out) != first


# Fine-tuning and evaluation through the command line: a small separable task, init=base.
FT = [
    "train=smoke",
    "finetune.epochs=3",
    "finetune.batch_size=8",
    "finetune.max_length=32",
    "evaluate.max_length=32",
    "init=base",
]


def _env() -> dict[str, str]:
    """The test session's environment (its model cache), one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ft_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft-task")
    task = small_task(folder, n_train=48, n_eval=16)
    write_csv(folder / "test.csv", rows(800, seed=2))  # predictions take long enough to hit
    return task


def _cli(stage, root, task, *extra):
    """The arguments of ``stage`` in ``root``'s run ``r`` on the small task."""
    return [
        stage,
        f"run.root={root}",
        "run.name=r",
        *FT,
        *task,
        *extra,
    ]


def _compose(stage, root, task):
    return compose(stage, [f"run.root={root}", "run.name=r", *FT, *task])


def _dirs(root, task):
    """(the fine-tune's folder, its evaluation's folder) in ``root``'s run ``r``."""
    dirs = stage_dirs(_compose("finetune", root, task))
    return dirs["finetune"], dirs["evaluate"] / "custom"


def _results(ft_dir, ev_dir):
    """The bytes of every result: weights and validation metrics, test metrics, predictions."""
    files = {
        "weights": ft_dir / "model" / "model.safetensors",
        "validation": ft_dir / "metrics.json",
        "test": ev_dir / "metrics.json",
        "predictions": ev_dir / "predictions.jsonl",
    }
    return {k: p.read_bytes() if p.is_file() else None for k, p in files.items()}


@pytest.fixture(scope="module")
def ft_reference(ft_task, tmp_path_factory):
    """An uninterrupted fine-tune and evaluation: the run ``r`` under the returned root."""
    root = tmp_path_factory.mktemp("ft-ref")
    for stage in ("finetune", "evaluate"):
        out = _here(_cli(stage, root, ft_task))
        assert out.returncode == 0, out.stderr[-3000:]
    ft_dir, ev_dir = _dirs(root, ft_task)
    results = _results(ft_dir, ev_dir)
    assert all(v is not None for v in results.values())
    return root, results


def _killed(argv, trigger, timeout=300.0) -> bool:
    """Run ``argv`` and SIGKILL it the moment ``trigger()`` holds (polled every millisecond);
    True when it was killed before it ended by itself."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if trigger() or time.monotonic() > deadline:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    return proc.wait() == -signal.SIGKILL


def _trigger(kind, partial):
    """When to kill: ``after:S`` seconds from the start (imports, loading), ``sealed`` (the work
    done, its outputs being listed and its manifest written), or the moment the file pattern
    appears in the stage's partial folder (optionally ``+S`` seconds later)."""
    if kind.startswith("after:"):
        at = time.monotonic() + float(kind.split(":")[1])
        return lambda: time.monotonic() >= at
    if kind == "sealed":  # the work is done: its attempt marker removed before the manifest
        return lambda: (partial / "metrics.json").is_file() and not any(partial.glob(".fing*"))
    pattern, _, later = kind.partition("+")
    seen: list[float] = []

    def fire():
        if not seen and any(partial.glob(pattern)):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() >= seen[0] + float(later or 0)

    return fire


def _not_finished_looking(stage_dir):
    """After a kill: either nothing in place (the stage is not finished for anyone) or, when
    the kill came after the swap, a whole finished stage; never something in between."""
    manifest = read_manifest(stage_dir)
    if manifest is not None:
        assert transaction.problem(stage_dir, manifest) is None
        return False
    assert not stage_dir.exists()
    state, _ = status.stage_state(stage_dir)
    assert state in ("missing", "interrupted", "failed"), state
    return True


def _only_the_lock_beside(stage_dir):
    beside = sorted(p.name for p in stage_dir.parent.iterdir() if p.name.startswith("."))
    assert beside == [f".{stage_dir.name}.lock"], beside


@pytest.mark.parametrize(
    "when",
    [
        *(
            pytest.param(when, marks=pytest.mark.slow)
            for when in (
                "after:2.5",  # starting up: loading the model and the data
                "finetune.log",  # the stage's work has just begun
                "checkpoints/checkpoint-*/model.safetensors",  # the first epoch's checkpoint
                "checkpoints/checkpoint-*/model.safetensors+0.4",  # training on, rotating
                "model/tokenizer.json",  # writing the tokenizer beside the weights
                "metrics.json",  # the outputs written, the model card and the manifest next
                "sealed",  # done and sealed: listing its files, the manifest, the swap next
            )
        ),
        "model/model.safetensors",  # writing the fine-tuned weights
    ],
)
def test_killed_finetune_then_the_same_command_gives_the_same_model(
    ft_task, ft_reference, tmp_path, when
):
    ft_dir, ev_dir = _dirs(tmp_path, ft_task)
    argv = _cli("finetune", tmp_path, ft_task)
    killed = _killed(_process(argv), _trigger(when, transaction.partial_dir(ft_dir)))
    if _not_finished_looking(ft_dir):
        assert killed
        # nothing downstream accepts it: evaluation refuses it before doing anything
        with pytest.raises(CmmergeError, match="finetune"):
            evaluate.run(_compose("evaluate", tmp_path, ft_task))
        assert not ev_dir.exists()
        if when == "model/model.safetensors":  # and on the command line, in one line
            out = _here(_cli("evaluate", tmp_path, ft_task))
            assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert "Traceback" not in out.stderr and "finetune" in out.stderr
            out = _here(_cli("status", tmp_path, ft_task))
            row = next(
                line for line in out.stdout.splitlines() if f"| finetune/{ft_dir.name}" in line
            )
            assert row.split("|")[2].strip() == "interrupted", row  # the command redoes it
    done = _here(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert transaction.problem(ft_dir) is None
    ours = _results(ft_dir, ev_dir)
    theirs = ft_reference[1]
    assert ours["weights"] == theirs["weights"]  # bit-identical weights
    assert ours["validation"] == theirs["validation"]  # the same validation metrics
    _only_the_lock_beside(ft_dir)


@pytest.mark.parametrize(
    "when",
    [
        *(
            pytest.param(when, marks=pytest.mark.slow)
            for when in (
                "after:2.0",  # starting up
                "evaluate.log",  # the stage's work has just begun
                "metrics.json",  # the metrics written, the predictions next
                ".predictions.jsonl.*",  # writing the predictions' temporary file
                "predictions.jsonl",  # the outputs written, the manifest next
            )
        ),
        ".predict",  # predicting
    ],
)
def test_killed_evaluate_then_the_same_command_gives_the_same_predictions(
    ft_task, ft_reference, tmp_path, when
):
    ref_root, reference = ft_reference
    ref_ft, _ = _dirs(ref_root, ft_task)
    ft_dir, ev_dir = _dirs(tmp_path, ft_task)
    shutil.copytree(ref_ft.parent, ft_dir.parent)  # the finished fine-tune (and its lock file)
    argv = _cli("evaluate", tmp_path, ft_task)
    killed = _killed(_process(argv), _trigger(when, transaction.partial_dir(ev_dir)))
    if _not_finished_looking(ev_dir):
        assert killed
    done = _here(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert transaction.problem(ev_dir) is None
    ours = _results(ft_dir, ev_dir)
    assert ours == reference  # the same predictions and metrics, the fine-tune untouched
    assert not list(tmp_path.rglob(".predictions.jsonl.*"))  # no orphaned temporary files
    assert not list(tmp_path.rglob(".predict"))
    _only_the_lock_beside(ev_dir)


def test_finetune_write_failure_is_one_line_and_a_rerun_completes(ft_task, ft_reference, tmp_path):
    ft_dir, _ = _dirs(tmp_path, ft_task)
    argv = _cli("finetune", tmp_path, ft_task)
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -f 200; exec {shlex.join(_process(argv))}"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in lines[0] or "file size" in lines[0], lines[0]
    assert not ft_dir.exists() and not transaction.partial_dir(ft_dir).exists()
    state, detail = status.stage_state(ft_dir)
    assert state == "failed" and "File too large" in detail
    done = _here(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ft_dir / "model" / "model.safetensors").read_bytes() == ft_reference[1]["weights"]
    _only_the_lock_beside(ft_dir)  # the failure record is gone with the failure
