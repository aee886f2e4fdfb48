"""Two processes under `accelerate launch` (torchrun + gloo on the CPU): trained together, saved
once, complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FAST, compose
from transformers import AutoModelForSequenceClassification

from cmmerge.config.ids import stage_dirs
from cmmerge.io.manifest import read_manifest


@pytest.mark.slow  # three launches of two processes each: `pytest -m slow`
def test_two_process_cpt_finetune_and_evaluate(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is installed with the package"
    # `--cpu --num_processes 2` starts one process in accelerate 1.x (its simple launcher);
    # `--multi_gpu` goes through torchrun, which on a machine without GPUs runs CPU processes.
    launch = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cmmerge.cli",
    ]
    args = ["init=base", f"run.root={tmp_path}", "run.name=ddp", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for stage in ("cpt", "finetune", "evaluate"):
        out = subprocess.run(
            [*launch, stage, *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert out.returncode == 0, out.stderr[-3000:]
    dirs = stage_dirs(compose("finetune", args))
    cpt = read_manifest(dirs["cpt"])
    assert cpt["world_size"] == 2 and cpt["metrics"]["steps"] == 8
    # the training loss is the mean over both processes' batches, not scaled by their number
    ratio = cpt["metrics"]["train_loss"] / cpt["metrics"]["loss_before"]
    assert 0.8 < ratio < 1.2, cpt["metrics"]
    ft = dirs["finetune"]
    manifest = read_manifest(ft)
    assert manifest["world_size"] == 2
    # 1500 texts, batch 32 per process, 2 processes: 24 steps for the epoch (not 47)
    assert manifest["steps"] == 24
    model = AutoModelForSequenceClassification.from_pretrained(ft / "model")
    assert model.num_labels == 3
    assert not list(ft.glob("checkpoints*")) and not list(ft.glob(".*tmp*"))
    ev = dirs["evaluate"] / "sentiment-en-hi"
    assert read_manifest(ev)["world_size"] == 2
    lines = (ev / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 300  # every test text once, not once per process
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 300
