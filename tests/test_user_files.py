"""Never lose a user's files (issue 27), one row per case, through the command line in-process:
what `merge output=` may replace, freshness by content, broken outputs refused, `run.name`
confined to `run.root`, a full disk in a stage's failure handler, the command `status` prints,
one-line errors, a missing launcher; and a seeded property: whatever `output=` and run name,
every file that existed before a command and that cmmerge did not write is unchanged after."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose, xlmr_pair
from omegaconf import OmegaConf
from safetensors.torch import load_file
from small_task import small_task

from cmmerge.cli import main
from cmmerge.commands import status
from cmmerge.config.values import run_context
from cmmerge.io import transaction
from cmmerge.io.manifest import read_manifest
from cmmerge.stages.runner import failure_file, run_transaction, stage_input


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """A tiny XLM-R base and tuned pair, and one with a 120-row vocabulary."""
    root = tmp_path_factory.mktemp("pair")
    xlmr_pair(root)
    xlmr_pair(root / "big", vocab=120)
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``cmmerge ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def merge(pair: Path, capsys, out: Path, *extra: str) -> tuple[int, str, str]:
    base, tuned = pair / "base", pair / "tuned"
    return cli(capsys, "merge", f"base={base}", f"models=[{tuned}]", f"output={out}", *extra)


def one_line(err: str, stage: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cmmerge {stage}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fake_stage(run: Path, stage: str, folder: str, text: str = "weights") -> Path:
    """A finished stage folder made by cmmerge's runner (a stand-in for a real fine-tune)."""
    cfg = OmegaConf.create({"run": {"root": str(run.parent), "name": run.name}, "force": False})
    stage_dir = run / folder

    def work(d: Path) -> dict:
        (d / "model").mkdir()
        (d / "model" / "model.safetensors").write_text(text)
        (d / "metrics.json").write_text('{"macro_f1": 0.5}')
        return {"outputs": ["model/", "metrics.json"]}

    run_transaction(run_context(cfg), stage, stage_dir, {"stage": stage, "text": text}, [], work)
    return stage_dir


# --- 1. deletion: what `merge output=` may replace -------------------------------------------


def _web_app(tmp: Path) -> tuple[Path, list[str]]:
    out = tmp / "web"
    out.mkdir()
    (out / "index.html").write_text("<html></html>")
    (out / "manifest.json").write_text('{"name": "my app", "start_url": "."}')
    return out, []


def _run_stage_folder(tmp: Path) -> tuple[Path, list[str]]:
    return fake_stage(tmp / "runs" / "r", "finetune", "finetune/base-sentiment-en-hi-s0"), []


def _inside_a_stage_folder(tmp: Path) -> tuple[Path, list[str]]:
    stage = fake_stage(tmp / "runs" / "r", "finetune", "finetune/base-sentiment-en-hi-s0")
    return stage / "model", ["force=true"]


def _run_merge_folder(tmp: Path) -> tuple[Path, list[str]]:
    return fake_stage(tmp / "runs" / "r", "merge", "merge/ties-l0.5-d0.2@en-hi"), ["force=true"]


def _a_file(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "notes.txt").write_text("my notes")
    return tmp / "notes.txt", []


def _below_a_file(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "notes.txt").write_text("my notes")
    return tmp / "notes.txt" / "merged", []


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_web_app, "holds files cmmerge did not write (index.html, manifest.json)"),
        (_run_stage_folder, "is a run directory's stage folder of cmmerge finetune"),
        (_inside_a_stage_folder, "lies inside"),
        (_run_merge_folder, "is a run directory's stage folder of cmmerge merge"),
        (_a_file, "is a file, not a folder"),
        (_below_a_file, "notes.txt is a file, not a folder"),
    ],
    ids=["web-app", "run-stage", "inside-stage", "run-merge", "a-file", "below-a-file"],
)
def test_merge_output_never_replaces_what_cmmerge_did_not_make(
    pair, tmp_path, capsys, make, needle
):
    out, extra = make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = merge(pair, capsys, out, "lambda=0.5", *extra)
    assert code == 2 and needle in one_line(err, "merge")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    for stage in [p for p in tmp_path.glob("runs/r/*/*") if not p.name.startswith(".")]:
        assert status.stage_state(stage)[0] == "finished"


def test_files_added_to_an_earlier_output_are_kept_when_it_is_redone(pair, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge(pair, capsys, out, "lambda=0.5")[0] == 0
    first = load_file(str(out / "model.safetensors"))
    (out / "NOTES.md").write_text("what I found")
    (out / "eval").mkdir()
    (out / "eval" / "scores.csv").write_text("a,b\n")
    code, out_text, _ = merge(pair, capsys, out, "lambda=0.7")
    assert code == 0 and "lambda=0.7" in out_text
    assert (out / "NOTES.md").read_text() == "what I found"
    assert (out / "eval" / "scores.csv").read_text() == "a,b\n"
    second = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    from cmmerge.io.ownership import foreign

    assert foreign(out) == ["NOTES.md", "eval/scores.csv"]
    assert transaction.problem(out) is None


def test_a_user_file_an_output_would_replace_is_named_and_force_replaces_it(pair, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge(pair, capsys, out, "lambda=0.5", "method.sign=count")[0] == 0  # no mergekit.yaml
    assert not (out / "mergekit.yaml").exists()
    (out / "mergekit.yaml").write_text("my own config\n")
    code, _, err = merge(pair, capsys, out, "lambda=0.5")
    assert code == 2 and "(mergekit.yaml): move them away, or force=true" in one_line(err, "merge")
    assert (out / "mergekit.yaml").read_text() == "my own config\n"
    assert read_manifest(out)["config"]["params"]["sign"] == "count"  # the earlier merge stands
    assert merge(pair, capsys, out, "lambda=0.5", "force=true")[0] == 0
    assert "merge_method" in (out / "mergekit.yaml").read_text()


def test_force_writes_beside_a_foreign_folder_and_keeps_its_files(pair, tmp_path, capsys):
    out, _ = _web_app(tmp_path)
    assert merge(pair, capsys, out, "lambda=0.5", "force=true")[0] == 0
    assert (out / "index.html").read_text() == "<html></html>"
    assert read_manifest(out)["stage"] == "merge" and transaction.problem(out) is None


# --- 2. freshness by content ------------------------------------------------------------------


def _cfg(tmp_path: Path) -> OmegaConf:
    return OmegaConf.create({"run": {"root": str(tmp_path), "name": "r"}, "force": False})


def _downstream(tmp_path: Path, up: Path, extra: list[dict] | None = None) -> Path:
    def work(d: Path) -> dict:
        (d / "metrics.json").write_text('{"macro_f1": 0.6}')
        return {"outputs": ["metrics.json"]}

    inputs = [stage_input(up, "make up"), *(extra or [])]
    down = tmp_path / "r" / "evaluate" / "ft" / "task"
    run_transaction(run_context(_cfg(tmp_path)), "evaluate", down, {}, inputs, work)
    return down


def _rewrite(path: Path, data: bytes) -> None:
    time.sleep(0.01)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("edit", "state"),
    [
        (lambda p: _rewrite(p, b"WEIGHTS"), "stale"),  # same size, other content
        (lambda p: _rewrite(p, b"weights"), "finished"),  # rewritten as it was: time only
        (lambda p: os.utime(p, (1, 1)), "finished"),  # touched
    ],
    ids=["same-size-new-content", "same-content", "touched"],
)
def test_a_finished_stage_is_checked_by_content(tmp_path, edit, state):
    up = fake_stage(tmp_path / "r", "finetune", "finetune/ft")
    down = _downstream(tmp_path, up)
    edit(up / "model" / "model.safetensors")
    assert status.stage_state(up)[0] == state
    assert status.stage_state(down)[0] == state
    if state == "stale":
        assert "model/model.safetensors changed" in status.stage_state(up)[1]
        with pytest.raises(Exception, match="changed since it was written"):
            stage_input(up, "make up")


def test_an_external_input_changed_in_place_makes_its_users_stale(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"a" * 64)
    up = fake_stage(tmp_path / "r", "finetune", "finetune/ft")
    from cmmerge.stages.runner import folder_input

    down = _downstream(tmp_path, up, [folder_input(base)])
    assert status.stage_state(down)[0] == "finished"
    _rewrite(base / "model.safetensors", b"b" * 64)
    assert status.stage_state(down) == ("stale", "base changed since it was made")


# --- 3. broken outputs ------------------------------------------------------------------------


def _bad_config(pair: Path, tmp: Path) -> list[str]:
    bad = tmp / "bad-config"
    shutil.copytree(pair / "base", bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    return [f"base={bad}", f"models=[{pair / 'tuned'}]"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            lambda p, t: ["lambda=1e6", "dtype=float16"],
            "beyond the range of float16 (|x| > 65504), which become Inf when written",
        ),
        (
            lambda p, t: [f"models=[{p / 'big' / 'tuned'}]"],
            "has a larger vocabulary than the base (120 rows of",
        ),
        (_bad_config, "its config.json does not match its weights"),
    ],
    ids=["float16-overflow", "larger-vocabulary", "config-vs-weights"],
)
def test_broken_outputs_are_refused_before_anything_is_written(
    pair, tmp_path, capsys, args, needle
):
    out = tmp_path / "merged"
    code, _, err = merge(pair, capsys, out, *args(pair, tmp_path))
    assert code == 2 and needle in one_line(err, "merge")
    assert not out.exists() and not transaction.partial_dir(out).exists()


def test_a_larger_vocabulary_merges_only_when_asked_and_says_so(pair, tmp_path, capsys):
    out = tmp_path / "merged"
    big = pair / "big" / "tuned"
    code, text, _ = merge(pair, capsys, out, f"models=[{big}]", "grow_vocab=true")
    assert code == 0 and "vocabulary grown to 120 rows (grow_vocab=true)" in text
    assert read_manifest(out)["vocab_grown"]["roberta.embeddings.word_embeddings.weight"] == 120
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 120


# --- 4. run.name confined to run.root ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../escape", "a/../../escape", "{abs}/x", "..", ".", ""],
    ids=["dotdot", "normalised-out", "absolute", "parent", "root-itself", "empty"],
)
def test_a_run_name_leaving_run_root_is_refused(pair, tmp_path, capsys, name):
    name = name.format(abs=tmp_path / "abs")
    root = tmp_path / "R" / "a" / "b"
    code, _, err = cli(
        capsys, "merge", f"base={pair / 'base'}", f"models=[{pair / 'tuned'}]",
        f"run.root={root}", f"run.name={name}",
    )  # fmt: skip
    assert code == 2 and "must name a folder inside run.root" in one_line(err, "merge")
    assert not (tmp_path / "R").exists() and not (tmp_path / "abs").exists()


# --- 5. a full disk in a stage's failure handler -----------------------------------------------


def test_a_full_disk_is_one_line_the_partial_goes_and_the_failure_is_recorded(
    pair, tmp_path, capsys, monkeypatch
):
    from cmmerge.stages import merge as merge_stage

    def full(*args, **kwargs):
        out_dir = Path(args[5])
        (out_dir / "model-00001.safetensors").write_bytes(b"0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "model.safetensors"))

    def copy_fails(src, dst, *a, **k):
        Path(dst).write_bytes(b"")  # a truncated copy, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    def log_fails(self, record):  # a log file on the full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            self.handleError(record)

    monkeypatch.setattr(merge_stage, "merge_models", full)
    monkeypatch.setattr(shutil, "copyfile", copy_fails)
    monkeypatch.setattr(logging.FileHandler, "emit", log_fails)
    args = [
        "merge", f"base={pair / 'base'}", f"models=[{pair / 'tuned'}]", "lambda=0.5",
        f"run.root={tmp_path}", "run.name=r",
    ]  # fmt: skip
    code, _, err = cli(capsys, *args)
    monkeypatch.undo()
    found = [p for p in (tmp_path / "r" / "merge").iterdir() if p.name.endswith(".failed.json")]
    assert len(found) == 1
    stage = found[0].parent / found[0].name[1 : -len(".failed.json")]
    line = one_line(err, "merge")
    assert f"cannot write the outputs of {stage}" in line and "No space left on device" in line
    assert "Logging error" not in err
    assert not transaction.partial_dir(stage).exists() and not stage.exists()
    record = json.loads(failure_file(stage).read_text())
    assert "No space left on device" in record["error"] and record["log"] is None
    assert not (stage.parent / f".{stage.name}.failed.log").exists()  # no truncated copy left
    assert cli(capsys, *args)[0] == 0  # space freed: the same command completes
    assert transaction.problem(stage) is None and not failure_file(stage).exists()


# --- 6. the command `status` prints resumes the stage ---------------------------------------


def test_status_prints_the_command_that_resumes_an_interrupted_stage(tmp_path, capsys, monkeypatch):
    from cmmerge.stages import runner

    task = small_task(tmp_path / "task")
    args = [
        "finetune", f"run.root={tmp_path}", "run.name=k", "init=base", *FAST, *task,
        "finetune.max_steps=1", "finetune.batch_size=8",
    ]  # fmt: skip

    def killed(*a, **k):  # SIGKILL stand-in: nothing after this point runs
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_do", killed)
    monkeypatch.setattr(runner, "_record_failure", lambda *a, **k: None)
    monkeypatch.setattr(transaction, "discard", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        cli(capsys, *args)
    monkeypatch.undo()
    code, out, _ = cli(capsys, "status", f"run.root={tmp_path}", "run.name=k")
    assert code == 0
    rows = [r for r in out.splitlines() if "| interrupted |" in r]
    assert len(rows) == 1, out
    command = rows[0].split("|")[-2].strip()
    assert command.startswith("cmmerge finetune ") and "init=base" in command
    code, _, err = cli(capsys, *shlex.split(command)[1:])
    assert code == 0, err
    code, out, _ = cli(capsys, "status", f"run.root={tmp_path}", "run.name=k")
    assert "| finished |" in out and "interrupted" not in out


# --- 7. one-line errors through one boundary -------------------------------------------------


class Payload:
    """Not a tensor: what a pickle may smuggle in."""


def _model_dir(tmp: Path, name: str, edit) -> Path:
    from cmmerge.config.inputs import resolve_model

    folder = tmp / name
    shutil.copytree(resolve_model(compose("finetune", [])), folder)
    edit(folder)
    return folder


def _config_edit(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def _only_a_pickle(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": Payload()}, folder / "pytorch_model.bin")


FT = ["finetune", *FAST, "finetune.max_steps=1"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (lambda t: [*FT, "seed=-1"], "seed=-1: a seed is a whole number from 0 to 4294967295"),
        (lambda t: [*FT, f"seed={2**70}"], f"seed={2**70}: a seed is a whole number"),
        (
            lambda t: [*FT, f"init={_model_dir(t, 'hid', _config_edit(hidden_size=48))}"],
            "its config.json does not match its weights",
        ),
        (
            lambda t: [
                *FT,
                "init="
                + str(
                    _model_dir(
                        t, "auto", _config_edit(model_type="evilnet", auto_map={"AutoModel": "e.E"})
                    )
                ),
            ],
            "model type 'evilnet' is not one transformers",
        ),
        (
            lambda t: [*FT, f"init={_model_dir(t, 'pkl', _only_a_pickle)}", "allow_pickle=true"],
            "holds objects other than tensors",
        ),
        (
            lambda t: [
                "merge",
                f"base={_model_dir(t, 'pkl', _only_a_pickle)}",
                f"models=[{_model_dir(t, 'ok', lambda f: None)}]",
                "allow_pickle=true",
                f"output={t / 'out'}",
            ],
            "holds objects other than tensors",
        ),
        (
            lambda t: [
                "merge",
                f"base={_model_dir(t, 'ok', lambda f: None)}",
                f"models=[{_model_dir(t, 'ok2', lambda f: None)}]",
                f"output={_a_file(t)[0]}",
            ],
            "is a file, not a folder",
        ),
    ],
    ids=[
        "seed-negative",
        "seed-2**70",
        "init-wrong-hidden-size",
        "init-auto-map-unknown-type",
        "init-pickle-only",
        "merge-pickle-only",
        "output-is-a-file",
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    argv = [*args(tmp_path), f"run.root={tmp_path / 'runs'}"]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and needle in one_line(err, argv[0])
    assert "weights_only" not in err
    assert not list((tmp_path / "runs").rglob("manifest.json"))


def test_a_sweep_on_a_launcher_that_is_not_installed_names_it(tmp_path, capsys, monkeypatch):
    import importlib.abc

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith("hydra_plugins.hydra_joblib_launcher"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    monkeypatch.setattr(sys, "meta_path", [Missing(), *sys.meta_path])
    for name in [m for m in sys.modules if m.startswith("hydra_plugins.hydra_joblib_launcher")]:
        monkeypatch.delitem(sys.modules, name)
    args = ["sweep", "lambda=0.1,0.5", "hydra/launcher=joblib", f"run.root={tmp_path}"]
    code, _, err = cli(capsys, *args)
    line = one_line(err, "sweep")
    assert code == 2 and "the joblib launcher is not installed" in line
    assert "pip install 'cmmerge[launchers]'" in line and "hydra-joblib-launcher" in line
    assert not (tmp_path / "default").exists()


# --- the property: files cmmerge did not write are unchanged, whatever output= and run name ---


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _world(rng: random.Random, root: Path, pair: Path, capsys) -> None:
    """User folders and files, an earlier merge output with a user's file, a run directory."""
    for i in range(rng.randint(1, 3)):
        folder = root / f"user{i}"
        folder.mkdir(parents=True)
        for j in range(rng.randint(1, 3)):
            (folder / f"file{j}.txt").write_text(f"{rng.random()}")
        if rng.random() < 0.5:
            (folder / "manifest.json").write_text(json.dumps({"name": f"app{i}"}))
        if rng.random() < 0.3:
            (folder / "model.safetensors").write_bytes(os.urandom(64))
    (root / "loose.txt").write_text("a loose file")
    fake_stage(root / "runs" / "r", "finetune", "finetune/base-sentiment-en-hi-s0")
    if rng.random() < 0.5:
        assert merge(pair, capsys, root / "earlier", "lambda=0.5")[0] == 0
        (root / "earlier" / "NOTES.md").write_text("mine")


def _outputs(rng: random.Random, root: Path) -> Path:
    folders = [p for p in root.rglob("*") if p.is_dir()]
    files = [p for p in root.rglob("*") if p.is_file()]
    choice = rng.choice(["folder", "file", "new", "below-file", "dotted", "nested-new"])
    if choice == "folder":
        return rng.choice(folders)
    if choice == "file":
        return rng.choice(files)
    if choice == "below-file":
        return rng.choice(files) / "x"
    if choice == "dotted":
        return rng.choice(folders) / ".." / rng.choice(["x", "earlier", "user0"])
    return rng.choice(folders) / f"new{rng.randint(0, 9)}"


_NAMES = ["r", "other", "a/b", "../r", "a/../../x", "/tmp/cmmerge-abs", "..", "r/finetune", "."]


def test_files_cmmerge_did_not_write_are_unchanged_whatever_the_output_and_run_name(
    pair, tmp_path, capsys
):
    rng = random.Random(27)
    for case in range(14):
        root = tmp_path / f"case{case}"
        _world(rng, root, pair, capsys)
        ours = set()  # what earlier cmmerge commands wrote (their records list it)
        for marker in root.rglob(".cmmerge.json"):
            record = json.loads(marker.read_text())
            ours |= {marker, *(marker.parent / f for f in record["files"])}
        mine = {
            p: _digest(p)
            for p in root.rglob("*")
            if p.is_file() and p not in ours and not p.name.endswith(".lock")
        }
        existed = set(root.rglob("*"))
        force = rng.random() < 0.25
        extra = [f"lambda={rng.choice([0.3, 0.5])}"] + (["force=true"] if force else [])
        if rng.random() < 0.5:
            out = _outputs(rng, root)
            args = [f"output={out}", *extra]
            if rng.random() < 0.5:
                args += [f"run.root={root / 'runs'}", f"run.name={rng.choice(_NAMES)}"]
        else:
            out = None
            args = [f"run.root={root / 'runs'}", f"run.name={rng.choice(_NAMES)}", *extra]
        code, _, err = cli(
            capsys, "merge", f"base={pair / 'base'}", f"models=[{pair / 'tuned'}]", *args
        )
        assert code in (0, 2), err
        if code == 2:
            one_line(err, "merge")
        written = set()
        if code == 0 and out is not None and force:
            record = json.loads((Path(os.path.normpath(out)) / ".cmmerge.json").read_text())
            written = {Path(os.path.normpath(out)) / f for f in record["files"]}
        for path, digest in mine.items():
            if path in written:
                continue  # force=true: a user file an output names is replaced, as documented
            assert path.is_file() and _digest(path) == digest, (case, args, path)
        assert not Path("/tmp/cmmerge-abs").exists()
        new = set(root.rglob("*")) - existed
        assert all(root in p.parents for p in new)
