"""The stages on the tiny decoder: causal-LM CPT, merge keeps the tied embeddings, classifier."""

from __future__ import annotations

import json

from conftest import FAST, compose
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cmmerge.commands import cpt, evaluate, extract, finetune, merge
from cmmerge.config.ids import stage_dirs
from cmmerge.io.manifest import read_manifest


def test_tiny_llama_cpt_merge_finetune_evaluate(tmp_path):
    cfg = compose(
        "finetune",
        [
            "model=tiny-llama",
            "method=ties",
            "lambda=0.7",
            "density=0.5",
            "init=merged",
            f"run.root={tmp_path}",
            "run.name=llama",
            *FAST,
        ],
    )
    cpt_manifest = cpt.run(cfg)
    assert cpt_manifest["kind"] == "decoder"
    assert cpt_manifest["metrics"]["perplexity"] < cpt_manifest["metrics"]["perplexity_before"]
    extract.run(cfg)
    merge.run(cfg)
    dirs = stage_dirs(cfg)
    assert dirs["merge"].name.startswith("ties-l0.7-d0.5@en-hi")
    merged = dirs["merge"] / "model"
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to embed_tokens, as in the base
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    finetune.run(cfg)
    evaluate.run(cfg)
    ev = dirs["evaluate"] / "sentiment-en-hi"
    assert read_manifest(ev) is not None
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 300 and 0 <= metrics["macro_f1"] <= 1
