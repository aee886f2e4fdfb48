"""The stage runner: manifest written last, skip when finished, redo on change, nothing on error."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from cmmerge.config.values import run_context
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import read_manifest
from cmmerge.stages.runner import run_transaction, stage_input


def _cfg(tmp_path, force=False):
    return OmegaConf.create(
        {"run": {"root": str(tmp_path), "name": "r"}, "force": force, "seed": 3}
    )


def test_manifest_records_the_stage_and_is_skipped_when_unchanged(tmp_path):
    calls = []

    def work(stage_dir):
        calls.append(stage_dir)
        (stage_dir / "out.txt").write_text("x")
        return {"metrics": {"macro_f1": 0.5}, "outputs": ["out.txt"], "note": "hi"}

    stage_dir = tmp_path / "r" / "s"
    first = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage_dir, {"a": 1, "seed": 3}, [], work
    )
    on_disk = json.loads((stage_dir / "manifest.json").read_text())
    assert on_disk["stage"] == "s" and on_disk["status"] == "finished"
    assert on_disk["metrics"] == {"macro_f1": 0.5} and on_disk["outputs"] == ["out.txt"]
    assert on_disk["note"] == "hi" and on_disk["seed"] == 3
    assert {"cmmerge", "torch", "transformers", "peft"} <= set(on_disk["versions"])
    assert on_disk["wall_time_s"] >= 0 and on_disk["peak_rss_mb"] > 0
    assert first["skipped"] is False

    second = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage_dir, {"a": 1, "seed": 3}, [], work
    )
    assert second["skipped"] is True and len(calls) == 1

    third = run_transaction(
        run_context(_cfg(tmp_path)), "s", stage_dir, {"a": 2, "seed": 3}, [], work
    )
    assert third["skipped"] is False and len(calls) == 2  # config changed: redone

    run_transaction(
        run_context(_cfg(tmp_path, force=True)), "s", stage_dir, {"a": 2, "seed": 3}, [], work
    )
    assert len(calls) == 3  # force redoes


def test_failed_stage_leaves_no_manifest(tmp_path):
    stage_dir = tmp_path / "r" / "s"

    def ok(d):
        return {}

    run_transaction(run_context(_cfg(tmp_path)), "s", stage_dir, {"a": 1}, [], ok)
    assert read_manifest(stage_dir) is not None

    def boom(d):
        (d / "half.bin").write_bytes(b"partial")
        raise CmmergeError("bad input")

    with pytest.raises(CmmergeError):
        run_transaction(run_context(_cfg(tmp_path)), "s", stage_dir, {"a": 2}, [], boom)
    assert read_manifest(stage_dir) is None  # the old manifest is gone too: not finished


def test_upstream_change_redoes_downstream(tmp_path):
    up, down = tmp_path / "r" / "up", tmp_path / "r" / "down"
    runs = []

    def work(d):
        runs.append(d.name.removeprefix(".partial-"))  # each stage works in its partial folder
        return {}

    run_transaction(run_context(_cfg(tmp_path)), "up", up, {"v": 1}, [], work)
    run_transaction(
        run_context(_cfg(tmp_path)), "down", down, {}, [stage_input(up, "make up")], work
    )
    run_transaction(
        run_context(_cfg(tmp_path)), "down", down, {}, [stage_input(up, "make up")], work
    )
    assert runs == ["up", "down"]
    run_transaction(run_context(_cfg(tmp_path)), "up", up, {"v": 2}, [], work)
    run_transaction(
        run_context(_cfg(tmp_path)), "down", down, {}, [stage_input(up, "make up")], work
    )
    assert runs == ["up", "down", "up", "down"]


def test_missing_upstream_names_the_command(tmp_path):
    with pytest.raises(CmmergeError, match="run `cmmerge cpt run.name=x` first"):
        stage_input(tmp_path / "nope", "cmmerge cpt run.name=x")
