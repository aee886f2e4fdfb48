"""The Gemma-3 replica of the zoo (tests/zoo.py: tied embeddings, sliding-window and global
attention layers, embeddings scaled in the forward pass, bfloat16, left padding) through
cpt -> extract -> merge (tv, ties) -> save -> reload, as a user runs it on google/gemma-3-270m."""

from __future__ import annotations

import json
import math

import pytest
import torch
import zoo
from conftest import FAST, compose, torch_threads

from cmmerge.commands import cpt, extract, merge
from cmmerge.config.ids import stage_dirs
from cmmerge.io.checkpoint import CheckpointReader

transformers = pytest.importorskip("transformers")

TIES = ["method=ties", "lambda=0.5", "density=0.2"]
TV = ["method=tv", "lambda=1.0"]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_gemma3_layout_survives_cpt_extract_merge_and_a_reload(tmp_path):
    base_dir = zoo.make("gemma-3-270m", tmp_path / "zoo")
    common = [
        f"model.name_or_path={base_dir}",
        f"run.root={tmp_path}",
        "run.name=gemma",
        *FAST,
        "cpt.max_steps=2",
        *zoo.small_data(tmp_path / "data", n_corpus=120),
    ]
    cpt.run(compose("cpt", common))
    extract.run(compose("extract", common))
    for overrides in (TV, TIES):
        merge.run(compose("merge", common + overrides))
    dirs = stage_dirs(compose("merge", common + TV))
    cpt_dir = dirs["cpt"] / "model"
    metrics = json.loads((dirs["cpt"] / "metrics.json").read_text())
    # the sliding/global mask keeps packed documents apart: CPT packs
    assert metrics["packing"] is True and metrics["steps"] == 2
    base_config = json.loads((base_dir / "config.json").read_text())
    tv_dir = dirs["merge"] / "model"
    ties_dir = stage_dirs(compose("merge", common + TIES))["merge"] / "model"
    ids = torch.tensor([[0, 5, 9, 17, 33, 64, 101, 7, 12, 40, 3, 8]])  # longer than the window
    for folder in (cpt_dir, tv_dir, ties_dir):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "gemma3_text", folder
        assert config["layer_types"] == zoo.GEMMA_LAYER_TYPES
        assert config["sliding_window"] == zoo.GEMMA_WINDOW
        assert config.get("tie_word_embeddings", True) is True
        assert config["query_pre_attn_scalar"] == base_config["query_pre_attn_scalar"]
        # the merge keeps the base's 4.55-era config; transformers reads both the same way
        rope = transformers.AutoConfig.from_pretrained(folder).rope_parameters
        assert rope["sliding_attention"]["rope_theta"] == base_config["rope_local_base_freq"]
        assert rope["full_attention"]["rope_theta"] == base_config["rope_theta"]
        with CheckpointReader(folder) as r:
            keys = set(r.keys())
            assert {str(r.dtype(k)) for k in keys} == {"float32"}  # merged in float32
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        scale = float(model.model.embed_tokens.embed_scale)
        assert scale == pytest.approx(math.sqrt(zoo.HIDDEN), rel=1e-6)
        assert model.config.layer_types == zoo.GEMMA_LAYER_TYPES
    # TV at lambda 1 is the CPT model: the same logits past the sliding window
    torch.testing.assert_close(_logits(tv_dir, ids), _logits(cpt_dir, ids), rtol=0, atol=1e-4)
    # and TIES at 0.5 lies between the base and the CPT model, not on either
    base, ties = _logits(base_dir, ids), _logits(ties_dir, ids)
    assert not torch.allclose(ties, base, atol=1e-4)
    assert not torch.allclose(ties, _logits(cpt_dir, ids), atol=1e-4)
    tau_file = dirs["extract"] / "task_vector.safetensors"
    with CheckpointReader(tau_file) as r:  # the tie: one embedding tensor, no lm_head
        assert "embed_tokens.weight" in r.keys() and not any("lm_head" in k for k in r.keys())
