"""The fine-tuning seed means something: it is set before the model and its new classification
head are built, so the same seed gives bit-identical fine-tuning on CPU alone, in a fresh
process, after other stages in the same process and after a resume; other seeds give other
heads and data orders."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FAST, compose
from safetensors.torch import load_file
from small_task import small_task
from transformers import DataCollatorWithPadding

import cmmerge.training.finetune as finetune_training
from cmmerge.commands import cpt, finetune
from cmmerge.config.ids import stage_dirs

SMALL = [*FAST, "finetune.max_steps=4", "finetune.batch_size=8", "init=base"]


def _tensors(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _head(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.startswith("classifier.")}


def _finetune(root: Path, name: str, *overrides: str) -> Path:
    """Fine-tune in this process; the stage's folder."""
    cfg = compose("finetune", [f"run.root={root}", f"run.name={name}", *SMALL, *overrides])
    finetune.run(cfg)
    return stage_dirs(cfg)["finetune"]


def test_the_seed_fixes_the_new_head_and_the_data_order(tmp_path, monkeypatch):
    batches: list[list[tuple[int, ...]]] = []

    class Recording(DataCollatorWithPadding):
        def __call__(self, features):
            batches[-1].append(tuple(len(f["input_ids"]) for f in features))
            return super().__call__(features)

    monkeypatch.setattr(finetune_training, "DataCollatorWithPadding", Recording)
    task = small_task(tmp_path / "task")
    heads = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        batches.append([])
        torch.rand(1000), random.random()  # what earlier stages would leave in the RNGs
        out = _finetune(tmp_path, run, *task, "finetune.lr=0", f"seed={seed}")  # initial head
        heads.append(_head(_tensors(out)))
    _assert_identical(heads[0], heads[1])
    assert not torch.equal(
        heads[0]["classifier.out_proj.weight"], heads[2]["classifier.out_proj.weight"]
    )
    assert batches[0] == batches[1]
    assert batches[0] != batches[2]


def test_same_seed_bit_identical_alone_after_other_stages_and_after_a_resume(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    task = small_task(tmp_path / "task")
    args = [f"run.root={tmp_path}", "run.name=fresh", *SMALL, *task]
    done = subprocess.run(
        [sys.executable, "-m", "cmmerge.cli", "finetune", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = _tensors(stage_dirs(compose("finetune", args))["finetune"])

    # in one process after another stage (as in a pipeline or a sweep)
    cpt.run(compose("cpt", [f"run.root={tmp_path}", "run.name=pipe", *FAST, "cpt.max_steps=2"]))
    after_cpt = _tensors(_finetune(tmp_path, "pipe", *task))
    _assert_identical(fresh, after_cpt)

    # a resumed pipeline: the finished upstream is skipped, fine-tuning redone
    assert cpt.run(
        compose("cpt", [f"run.root={tmp_path}", "run.name=pipe", *FAST, "cpt.max_steps=2"])
    )["skipped"]
    _assert_identical(fresh, _tensors(_finetune(tmp_path, "pipe", *task, "force=true")))
