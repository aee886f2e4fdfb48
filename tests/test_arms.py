"""The paper's other arms: LoRA fine-tuning, sequential and joint FT, class weights, transfer
evaluation, and the prompting baseline of a decoder."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, compose
from transformers import AutoModelForSequenceClassification

from cmmerge.commands import evaluate, finetune, prompt, report
from cmmerge.config.ids import stage_dirs
from cmmerge.config.specs import PromptSpec
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import read_manifest
from cmmerge.training.finetune import class_weights


def test_lora_finetune_sequential_joint_and_transfer(tmp_path):
    common = [f"run.root={tmp_path}", "run.name=arms", "init=base", *FAST]
    lora = compose("finetune", ["peft=lora", *common])
    manifest = finetune.run(lora)
    ft_dir = stage_dirs(lora)["finetune"]
    assert ft_dir.name.startswith("base-sentiment-en-hi-lora")
    assert manifest["arm"] == "Full FT (LoRA)"
    assert (ft_dir / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(ft_dir / "model")
    assert merged.num_labels == 3 and not any("lora" in n for n, _ in merged.named_parameters())

    seq = compose("finetune", ["finetune.sequential=[english-sentiment-en-hi]", *common])
    manifest = finetune.run(seq)
    assert manifest["arm"].startswith("Sequential FT")
    assert [s["task"] for s in manifest["sequential_steps"]] == ["english-sentiment-en-hi"]

    joint = compose("finetune", ["finetune.joint=[sentiment-en-es]", *common])
    finetune.run(joint)
    evaluate.run(
        compose(
            "evaluate",
            [
                "finetune.joint=[sentiment-en-es]",
                "eval_tasks=[sentiment-en-hi,sentiment-en-es]",
                *common,
            ],
        )
    )
    ev = stage_dirs(joint)["evaluate"]
    assert ev.name.startswith("base-sentiment-en-hi-joint_sentiment-en-es")
    assert read_manifest(ev / "sentiment-en-hi") and read_manifest(ev / "sentiment-en-es")
    es = json.loads((ev / "sentiment-en-es" / "metrics.json").read_text())
    assert es["n"] == 300  # the Spanglish test split

    report.run(compose("report", common))
    text = (tmp_path / "arms" / "report" / "report.md").read_text()
    assert "Full FT (LoRA)" in text and "Sequential FT" in text and "Joint FT" in text
    assert "test_macro_f1[sentiment-en-es]" in text


def test_lora_targets_that_do_not_exist_are_named(tmp_path):
    cfg = compose(
        "finetune",
        ["peft=lora", "peft.target_modules=[q_proj]", "init=base", f"run.root={tmp_path}", *FAST],
    )
    with pytest.raises(CmmergeError, match="q_proj.*its linear modules are: .*query"):
        finetune.run(cfg)


def test_balanced_class_weights():
    w = class_weights([0, 0, 0, 1], 3, "balanced")
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 4 / 3]))
    assert class_weights([0, 1], 2, None) is None


def test_prompting_a_decoder_zero_and_few_shot(tmp_path):
    common = ["model=tiny-llama", f"run.root={tmp_path}", "run.name=p"]
    for shots in (0, 2):
        cfg = compose("prompt", [*common, f"shots={shots}"])
        manifest = prompt.run(cfg)
        out = tmp_path / "p" / "prompt" / PromptSpec.from_config(cfg).folder_id
        assert out.name == f"tiny-llama-base-sentiment-en-hi-k{shots}-s0"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["n"] == 300 and 0 <= metrics["macro_f1"] <= 1
        assert len(manifest["shots_used"]) == shots
        preds = [json.loads(x) for x in (out / "predictions.jsonl").open()]
        assert all(p["pred"] == max(p["scores"], key=p["scores"].get) for p in preds)
    with pytest.raises(CmmergeError, match="needs a decoder"):
        prompt.run(compose("prompt", [f"run.root={tmp_path}"]))


def test_a_head_for_other_labels_and_an_untrainable_kind_are_named(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cmmerge.config.inputs import resolve_model
    from cmmerge.models.loading import model_kind

    base = resolve_model(compose("finetune", []))
    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(two)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (two / name).write_bytes((base / name).read_bytes())
    cfg = compose("finetune", [f"init={two}", f"run.root={tmp_path}", *FAST])
    with pytest.raises(CmmergeError, match="head for 2 labels, the task has 3"):
        finetune.run(cfg)

    t5 = tmp_path / "t5"
    AutoConfig.for_model(
        "t5", d_model=8, num_layers=1, num_heads=1, d_kv=4, d_ff=8, vocab_size=10
    ).save_pretrained(t5)
    with pytest.raises(CmmergeError, match="model type 't5'.*neither a masked-LM"):
        model_kind(t5)
