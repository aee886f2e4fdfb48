"""Training stages refuse what cannot train: non-finite weights in a model they load, a loss that
turns NaN, and splits with no non-blank text end with one clear line and no manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import FAST, cmmerge, compose
from safetensors.torch import load_file, save_file
from small_task import rows, small_task, write_csv

from cmmerge.commands import cpt, finetune
from cmmerge.config.ids import stage_dirs
from cmmerge.config.inputs import resolve_model
from cmmerge.errors import CmmergeError

SMALL = [*FAST, "finetune.max_steps=4", "finetune.batch_size=8", "init=base"]


def _manifests(root: Path) -> list[Path]:
    return list(root.rglob("manifest.json"))


def _with_nan(src: Path, dst: Path) -> Path:
    """A copy of the model folder ``src`` with one NaN weight."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    name = next(k for k in tensors if k.endswith("attention.self.query.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_model_with_one_nan_weight_is_refused(tmp_path):
    bad = _with_nan(resolve_model(compose("cpt", [])), tmp_path / "nan-model")
    out = cmmerge("finetune", f"run.root={tmp_path}", "run.name=r", *SMALL, f"init={bad}")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cmmerge finetune: error: ")
    assert f"{bad} holds NaN or infinite weights in 1 tensor(s) (" in last
    assert "Traceback" not in out.stderr
    with pytest.raises(CmmergeError, match="holds NaN or infinite weights"):
        cpt.run(compose("cpt", [f"model.name_or_path={bad}", f"run.root={tmp_path}", *FAST]))
    assert not _manifests(tmp_path)


def test_a_loss_that_turns_nan_stops_the_stage(tmp_path):
    args = [f"run.root={tmp_path}", *SMALL, *small_task(tmp_path / "task"), "finetune.lr=1e30"]
    with pytest.raises(CmmergeError, match=r"the training loss became nan between steps 1 and"):
        finetune.run(compose("finetune", args))
    assert not _manifests(tmp_path)


def test_blank_texts_are_dropped_and_a_blank_split_is_refused(tmp_path):
    task = small_task(tmp_path / "task")
    train = rows(48)
    train[3], train[7] = (" ", train[3][1]), ("", train[7][1])
    write_csv(tmp_path / "task" / "train.csv", train)
    cfg = compose("finetune", [f"run.root={tmp_path}", *SMALL, *task])
    manifest = finetune.run(cfg)
    assert manifest["data"]["custom"]["train"] == {"size": 46, "blank_dropped": 2}
    stage = stage_dirs(cfg)["finetune"]
    assert "train: 2 row(s) with blank text dropped" in (stage / "finetune.log").read_text()

    write_csv(tmp_path / "task" / "validation.csv", [(" ", "neg"), ("", "pos")])
    args = [f"run.root={tmp_path}", "run.name=blank", *SMALL, *task]
    with pytest.raises(CmmergeError) as err:
        finetune.run(compose("finetune", args))
    assert str(err.value) == (
        f"task custom: split validation ({tmp_path / 'task' / 'validation.csv'}) has no examples "
        "left (2 row(s) with blank text dropped)"
    )
    assert not _manifests(tmp_path / "blank")


def test_a_corpus_with_no_text_is_refused(tmp_path):
    (tmp_path / "blank.csv").write_text('text\n" "\n"\t"\n')
    args = [f"run.root={tmp_path}", "corpus=custom", f"corpus.paths=[{tmp_path / 'blank.csv'}]"]
    with pytest.raises(CmmergeError, match=r"^corpus custom: no text left for CPT \(0 read"):
        cpt.run(compose("cpt", [*args, *FAST]))
    assert not _manifests(tmp_path)
