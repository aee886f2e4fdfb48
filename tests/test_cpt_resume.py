"""An interrupted CPT leaves no manifest and resumes from its last checkpoint on the re-run;
LoRA CPT keeps the adapter and saves merged full weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, cmmerge, compose
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import cmmerge.training.cpt as training_cpt
from cmmerge.commands import cpt, extract
from cmmerge.config.ids import stage_dirs
from cmmerge.io.manifest import read_manifest
from cmmerge.io.transaction import partial_dir


def test_killed_cpt_resumes_from_its_checkpoint(tmp_path):
    args = [
        sys.executable,
        "-m",
        "cmmerge.cli",
        "cpt",
        f"run.root={tmp_path}",
        "run.name=r",
        "train=smoke",
        "cpt.max_steps=60",  # a checkpoint at 20 and 40: killed after the first
        "cpt.save_steps=20",
        "cpt.batch_size=8",
        "cpt.max_length=32",
    ]
    stage = stage_dirs(compose("cpt", args[4:]))["cpt"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    work = partial_dir(stage)  # a running stage writes beside its folder, renamed in at the end
    while not list((work / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the end"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # as a pre-empted job would be
    proc.wait()
    assert read_manifest(stage) is None  # unfinished: no manifest
    partial = work / "checkpoints" / "checkpoint-99999"  # as if killed while saving
    partial.mkdir(exist_ok=True)
    (partial / "config.json").write_text("{}")
    done = cmmerge(*args[3:])  # the same command, in this process
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = read_manifest(stage)
    assert manifest["metrics"]["resumed"] is True
    assert manifest["metrics"]["steps"] == 60
    assert not (stage / "checkpoints").exists()
    log = (stage / "cpt.log").read_text()
    assert "resuming CPT" in log and "checkpoint-99999" not in log


def test_lora_cpt_on_the_decoder_merges_the_adapter(tmp_path):
    cfg = compose("cpt", ["model=tiny-llama", "peft=lora", f"run.root={tmp_path}", *FAST])
    manifest = cpt.run(cfg)
    out = stage_dirs(cfg)["cpt"]
    assert manifest["metrics"]["lora"] is True
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    stats = extract.run(cfg)["metrics"]
    assert stats["l2_norm"] > 0  # the merged adapter changed the attention/MLP weights


class Preempted(Exception):
    """Stands for the job being killed right after a checkpoint was written."""


def test_resumed_cpt_gives_the_uninterrupted_weights_and_whole_run_metrics(tmp_path, monkeypatch):
    args = [f"run.root={tmp_path}", *FAST, "cpt.max_steps=6", "cpt.save_steps=2"]
    args += ["cpt.logging_steps=3", "cpt.batch_size=8", "cpt.eval_fraction=0.01"]
    whole_cfg, cut_cfg = (compose("cpt", [*args, f"run.name={n}"]) for n in ("whole", "cut"))
    whole = cpt.run(whole_cfg)

    class PreemptAfterSave(training_cpt.FiniteLossCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise Preempted

    monkeypatch.setattr(training_cpt, "FiniteLossCallback", PreemptAfterSave)
    with pytest.raises(Preempted):
        cpt.run(cut_cfg)
    assert read_manifest(stage_dirs(cut_cfg)["cpt"]) is None
    monkeypatch.undo()
    evaluations = []
    real_evaluate = training_cpt.CptTrainer.evaluate

    def counted(self, *a, **k):
        assert self.args.prediction_loss_only  # the loss only, no vocabulary-sized logits kept
        evaluations.append(self.state.global_step)
        return real_evaluate(self, *a, **k)

    monkeypatch.setattr(training_cpt.CptTrainer, "evaluate", counted)
    resumed = cpt.run(cut_cfg)
    assert evaluations == [6]  # the loss before training is read back, not measured again
    got, want = resumed["metrics"], whole["metrics"]
    assert got["loss_before"] == want["loss_before"]
    assert got["resumed"] and got["resumed_at_step"] == 4 and not want["resumed"]
    assert got["steps"] == want["steps"] == 6
    assert got["train_loss"] == want["train_loss"]  # the whole run's, not steps 5-6 only
    assert got["loss"] == want["loss"]
    a = load_file(str(stage_dirs(whole_cfg)["cpt"] / "model" / "model.safetensors"))
    b = load_file(str(stage_dirs(cut_cfg)["cpt"] / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
