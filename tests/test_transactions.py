"""Stages as transactions: locks, partial folders renamed into place, whole manifests only,
fresh upstreams, failures recorded, kills at any moment recoverable."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from omegaconf import OmegaConf

from cmmerge.config.values import run_context
from cmmerge.errors import CmmergeError
from cmmerge.io import hashes, transaction
from cmmerge.io.manifest import read_manifest
from cmmerge.stages.runner import (
    failure_file,
    folder_input,
    run_transaction,
    stage_input,
)


def _cfg(tmp_path, force=False):
    return OmegaConf.create({"run": {"root": str(tmp_path), "name": "r"}, "force": force})


def _writes(text="x", delay=0.0, calls=None):
    def work(d):
        if calls is not None:
            calls.append(os.getpid())
        time.sleep(delay)
        (d / "out.txt").write_text(text)
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"0" * 100)
        return {"outputs": ["out.txt", "sub/"]}

    return work


def test_outputs_appear_only_with_their_manifest(tmp_path):
    stage = tmp_path / "r" / "s"
    seen = {}

    def work(d):
        seen["during"] = stage.exists()
        return _writes()(d)

    manifest = run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], work)
    assert seen["during"] is False  # nothing in place while the stage runs
    assert manifest["files"] == {
        "out.txt": 1,
        "s.log": manifest["files"]["s.log"],
        "sub/w.bin": 100,
    }
    assert sorted(p.name for p in stage.parent.iterdir()) == [".s.lock", "s"]
    assert transaction.problem(stage) is None


def test_missing_or_resized_output_is_redone_and_refused_downstream(tmp_path):
    stage, calls = tmp_path / "r" / "s", []
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes(calls=calls))
    (stage / "sub" / "w.bin").unlink()
    with pytest.raises(CmmergeError, match=r"incomplete \(sub/w.bin is missing\).*`make s`"):
        stage_input(stage, "make s")
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes(calls=calls))
    assert len(calls) == 2 and (stage / "sub" / "w.bin").stat().st_size == 100
    (stage / "out.txt").write_text("longer")  # same name, other size
    assert "out.txt has 6 bytes" in transaction.problem(stage)


@pytest.mark.parametrize("content", ["{not json", '{"stage": "s"}', "[]", ""])
def test_damaged_manifest_counts_as_absent(tmp_path, content):
    stage, calls = tmp_path / "r" / "s", []
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes(calls=calls))
    (stage / "manifest.json").write_text(content)
    with pytest.raises(CmmergeError, match="not a finished stage|incomplete"):
        stage_input(stage, "make s")
    again = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes(calls=calls)
    )
    assert len(calls) == 2 and again["skipped"] is False and read_manifest(stage)["stage"] == "s"


def test_stale_upstream_is_refused(tmp_path):
    up, down = tmp_path / "r" / "up", tmp_path / "r" / "down"
    run_transaction(run_context(_cfg(tmp_path)), "up", up, {"v": 1}, [], _writes())
    run_transaction(
        run_context(_cfg(tmp_path)), "down", down, {}, [stage_input(up, "make up")], _writes()
    )
    run_transaction(
        run_context(_cfg(tmp_path)), "up", up, {"v": 2}, [], _writes()
    )  # up redone, down not
    with pytest.raises(CmmergeError, match=r"down is stale: .*up changed since it was made"):
        stage_input(down, "make down")


def test_external_folder_is_identified_by_content(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 64)
    first = folder_input(folder, tmp_path / "cache")
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(b"b" * 64)  # same size, new content
    assert folder_input(folder, tmp_path / "cache")["sha256"] != first["sha256"]


def test_failure_is_recorded_and_leaves_nothing_in_place(tmp_path):
    stage = tmp_path / "r" / "s"
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes())

    def boom(d):
        (d / "half.bin").write_bytes(b"partial")
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 2}, [], boom)
    assert read_manifest(stage) is None and not transaction.partial_dir(stage).exists()
    record = json.loads(failure_file(stage).read_text())
    assert record["error"] == "RuntimeError: a bug"
    assert "Traceback" in (stage.parent / ".s.failed.log").read_text()  # our bug: logged whole
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 2}, [], _writes())
    assert not failure_file(stage).exists() and read_manifest(stage)["config"] == {"a": 2}


@pytest.mark.parametrize(
    ("err", "text"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "w.bin"), "No space left on device"),
        (OSError(errno.EFBIG, "File too large"), "File too large"),
        (MemoryError(), "out of memory"),
    ],
)
def test_machine_failures_become_one_line_errors(tmp_path, err, text):
    def work(d):
        raise err

    with pytest.raises(CmmergeError, match=text):
        run_transaction(run_context(_cfg(tmp_path)), "s", tmp_path / "r" / "s", {}, [], work)


def test_resumable_stage_keeps_its_partial_folder_for_the_same_attempt(tmp_path):
    stage = tmp_path / "r" / "s"
    seen = []

    def interrupted(d):
        (d / "checkpoint").write_text("step 5")
        raise KeyboardInterrupt

    def resumes(d):
        seen.append((d / "checkpoint").read_text() if (d / "checkpoint").exists() else None)
        return {}

    with pytest.raises(KeyboardInterrupt):
        run_transaction(
            run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], interrupted, resumable=True
        )
    run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 2}, [], resumes, resumable=True
    )  # other attempt
    with pytest.raises(KeyboardInterrupt):
        run_transaction(
            run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], interrupted, resumable=True
        )
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], resumes, resumable=True)
    assert seen == [None, "step 5"]


def _race(root: str, force: bool, calls_file: str) -> None:
    cfg = OmegaConf.create({"run": {"root": root, "name": "r"}, "force": force})

    def work(d):
        with open(calls_file, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return _writes()(d)

    run_transaction(run_context(cfg), "s", transaction.Path(root) / "r" / "s", {"a": 1}, [], work)


@pytest.mark.parametrize("force", [False, True])
def test_two_processes_on_one_stage_do_it_once(tmp_path, force):
    calls = tmp_path / "calls.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_race, args=(str(tmp_path), force, str(calls))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(calls.read_text().split()) == 1  # the second waited, then found it finished
    assert transaction.problem(tmp_path / "r" / "s") is None


_KILLABLE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from omegaconf import OmegaConf
    from cmmerge.config.values import run_context
    from cmmerge.stages.runner import run_transaction

    root = sys.argv[1]
    cfg = OmegaConf.create({"run": {"root": root, "name": "r"}, "force": False})

    def work(d):
        for i in range(20):
            (d / f"part{i}.bin").write_bytes(bytes(1000) * (i + 1))
            time.sleep(0.01)
        return {"outputs": ["."]}

    run_transaction(run_context(cfg), "s", Path(root) / "r" / "s", {"a": 1}, [], work)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.15, 0.3, 0.6, 1.5])
def test_sigkill_at_any_moment_then_rerun_completes(tmp_path, delay):
    script = tmp_path / "stage.py"
    script.write_text(_KILLABLE)
    stage = tmp_path / "r" / "s"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if read_manifest(stage) is not None:  # it finished before the kill: then it is whole
        assert transaction.problem(stage) is None
    else:
        assert not stage.exists() or not any(stage.iterdir())
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    assert transaction.problem(stage) is None
    assert sorted(read_manifest(stage)["files"]) == sorted(
        [f"part{i}.bin" for i in range(20)] + ["s.log"]
    )
    leftovers = [p.name for p in stage.parent.iterdir() if p.name not in ("s", ".s.lock")]
    assert leftovers == []


def test_swap_cut_short_is_completed_on_the_next_run(tmp_path):
    stage = tmp_path / "r" / "s"
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes())
    # a kill between the two renames: the old folder moved aside, the new one still partial
    partial = transaction.partial_dir(stage)
    os.replace(stage, partial)
    (stage.parent / ".old-s-deadbeef").mkdir()
    calls = []
    again = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes(calls=calls)
    )
    assert again["skipped"] is True and calls == []
    assert sorted(p.name for p in stage.parent.iterdir()) == [".s.lock", "s"]


def test_a_data_file_edited_in_place_redoes_the_stage(tmp_path):
    from conftest import compose

    from cmmerge.commands import data

    train = tmp_path / "train.csv"
    rows = "".join(f"text {i} yaar,{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    train.write_text("text,label\n" + rows)
    overrides = [
        f"run.root={tmp_path}",
        "task=custom",
        f"task.train={train}",
        f"task.test={train}",
        "data.token_lengths=false",
    ]
    assert data.run(compose("data", overrides))["skipped"] is False
    assert data.run(compose("data", overrides))["skipped"] is True
    time.sleep(0.01)
    train.write_text(train.read_text().replace("text 3 yaar", "text 3 bhai"))  # same size
    assert data.run(compose("data", overrides))["skipped"] is False


def test_a_library_failing_on_damaged_input_weights_becomes_one_line(tmp_path):
    """transformers / safetensors fail on a truncated or missing weight file of an input model
    folder with their own errors; the stage names the file in one line (a user error), and
    leaves any other failure of the same types as a bug."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from cmmerge.stages.runner import as_user_error

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, str(model / "model.safetensors"))
    inputs = [{"path": str(tmp_path / "data.csv"), "sha256": "x"}, {"path": str(model)}]
    loading = SafetensorError("Error while deserializing header: incomplete metadata")
    assert as_user_error(loading, tmp_path / "s", inputs) is None  # the weights read: a bug

    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = as_user_error(loading, tmp_path / "s", inputs)
    assert isinstance(err, CmmergeError) and "model.safetensors: truncated" in str(err)

    (model / "model.safetensors").unlink()  # transformers: OSError without an errno
    err = as_user_error(OSError("Error no file named model.safetensors"), tmp_path / "s", inputs)
    assert isinstance(err, CmmergeError) and "no model.safetensors or" in str(err)
    assert as_user_error(RuntimeError("a bug"), tmp_path / "s", inputs) is None
    # a finished stage's model/ is looked into as well
    stage_model = tmp_path / "ft" / "model"
    stage_model.mkdir(parents=True)
    (stage_model / "config.json").write_text("{}")
    err = as_user_error(loading, tmp_path / "s", [{"path": str(tmp_path / "ft")}])
    assert isinstance(err, CmmergeError) and str(stage_model) in str(err)


def test_a_redo_killed_between_its_manifest_and_the_swap_is_completed(tmp_path, monkeypatch):
    """A stage redone in place of an older version (invalidated first) and killed after the
    new manifest is written but before the swap: the next run puts the finished new version
    in place instead of doing the work again, and never revives the old one."""
    stage = tmp_path / "r" / "s"
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes("old"))

    def killed(stage_dir, partial, *rest):
        raise KeyboardInterrupt  # SIGKILL stand-in: nothing after this point runs

    monkeypatch.setattr(transaction, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 2}, [], _writes("new"))
    monkeypatch.undo()
    assert read_manifest(stage) is None  # the old version: no longer finished
    assert read_manifest(transaction.partial_dir(stage))["config"] == {"a": 2}
    calls: list = []
    again = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 2}, [], _writes("new", calls=calls)
    )
    assert again["skipped"] is True and calls == [] and (stage / "out.txt").read_text() == "new"
    assert sorted(p.name for p in stage.parent.iterdir()) == [".s.lock", "s"]
    # the same cut with a partial whose files were damaged since: not put in place, redone
    monkeypatch.setattr(transaction, "commit", killed)
    with pytest.raises(KeyboardInterrupt):
        run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 3}, [], _writes("third"))
    monkeypatch.undo()
    (transaction.partial_dir(stage) / "sub" / "w.bin").write_bytes(b"short")
    again = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage, {"a": 3}, [], _writes("third", calls=calls)
    )
    assert again["skipped"] is False and len(calls) == 1 and transaction.problem(stage) is None


def test_outputs_are_recorded_by_block_digest_and_older_sha256_records_still_count(tmp_path):
    stage = tmp_path / "r" / "s"
    manifest = run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes())
    assert all(d.startswith(hashes.BLOCKS) for _, d in manifest["digests"].values())
    w = stage / "sub" / "w.bin"
    older = {  # a manifest of an earlier version: plain SHA-256 of each output
        **manifest,
        "digests": {"sub/w.bin": [1, hashlib.sha256(w.read_bytes()).hexdigest()]},
    }
    sha256_blocks = {  # one of the version before: SHA-256 block digests
        **manifest,
        "digests": {"sub/w.bin": [1, hashes.block_digests([w], mark=hashes.SHA256_BLOCKS)[0]]},
    }
    for record in (manifest, older, sha256_blocks):
        os.utime(w, ns=(5, 5))  # another time, the same content: hashed, still finished
        assert transaction.changed(stage, record) is None
        w.write_bytes(b"1" * 100)  # same size, other content
        os.utime(w, ns=(6, 6))
        assert "sub/w.bin changed since it was written" in transaction.changed(stage, record)
        w.write_bytes(b"0" * 100)


def test_a_prune_beside_the_check_neither_unfinishes_the_stage_nor_raises(tmp_path, monkeypatch):
    """Another process prunes ``sub/`` (records it, then deletes it) just as this one checks
    the stage: the file is gone when it is looked at, the record already there. The check must
    read the record after it sees the file missing (a sweep beside another once exited 1 on a
    file that vanished between two looks), and find the stage finished."""
    from pathlib import Path

    stage = tmp_path / "r" / "s"
    run_transaction(run_context(_cfg(tmp_path)), "s", stage, {"a": 1}, [], _writes())
    target, real_stat, fired = stage / "sub" / "w.bin", Path.stat, []

    def racing_stat(self, *args, **kwargs):
        if self == target and not fired:  # the other process prunes right now
            fired.append(True)
            (stage / transaction.PRUNED).write_text(json.dumps({"pruned": ["sub/"], "bytes": 100}))
            target.unlink()
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", racing_stat)
    assert transaction.problem(stage) is None and fired
    monkeypatch.undo()
    assert transaction.finished_manifest(stage) is not None
    (stage / transaction.PRUNED).unlink()  # a file missing without a record: not finished
    assert transaction.problem(stage) == "sub/w.bin is missing"
