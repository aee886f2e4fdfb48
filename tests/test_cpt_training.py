"""Packing keeps documents apart; fast-loss CPT trains like the default, saves the same layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from test_tiny import ARCH
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaForCausalLM

from cmmerge.models.tiny import build_tiny_model
from cmmerge.training.cpt import train_lm, use_packing
from cmmerge.training.losses import causal_lm_loss
from cmmerge.training.packing import pack_examples, packing_collator, packing_keeps_documents_apart

TEXTS = [
    "yaar ye movie bahut acchi thi",
    "kya bakwas hai bro, ekdum bekaar",
    "me encanta esta cancion lol",
    "this is so bad yaar",
    "que bonito dia hoy amigo",
    "aaj ka match dekha kya, kohli ne kamaal kar diya",
] * 30
PARAMS = dict(
    seed=0,
    epochs=1,
    max_steps=4,
    batch_size=8,
    grad_accum=1,
    max_length=24,
    lr=1e-3,
    warmup=0.0,
    weight_decay=0.0,
    mlm_probability=0.15,
    eval_fraction=0.05,
    logging_steps=50,
    loss_chunk_size=16,
    precision="fp32",  # the comparisons below hold in float32, also on a GPU
)


def _llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return tiny_llama(101, attn_implementation=attn)


def test_pack_examples_restarts_positions_and_ignores_document_starts():
    out = pack_examples({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the tail [9] is dropped
    assert out["position_ids"] == [[0, 1, 2, 0], [1, 0, 1, 2]]
    assert out["labels"] == [[-100, 2, 3, -100], [5, -100, 7, 8]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_documents_run_separately(attn):
    model = _llama(attn)
    assert packing_keeps_documents_apart(model)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (7, 11, 5)]
    block = pack_examples({"input_ids": docs}, block_size=23)
    batch = packing_collator([{k: v[0] for k, v in block.items()}])
    labels = batch.pop("labels")
    packed = causal_lm_loss(model, batch, labels, chunk_size=6)
    # the default loss of each document on its own, weighted by its number of targets
    total = sum(
        model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1)
        for d in docs
    )
    separate = total / sum(len(d) - 1 for d in docs)
    assert abs(packed.item() - separate.item()) < 1e-5


class _Leaky(nn.Module):
    """A "model" whose every position sees all earlier tokens, whatever the position_ids."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=50, _attn_implementation="none")
        self.emb = nn.Embedding(50, 50)

    def forward(self, input_ids, position_ids=None, use_cache=None):  # noqa: ARG002
        return SimpleNamespace(logits=self.emb(input_ids).cumsum(1))


def test_packing_falls_back_when_the_model_mixes_documents(caplog):
    leaky = _Leaky()
    assert not packing_keeps_documents_apart(leaky)
    with caplog.at_level(logging.WARNING, logger="cmmerge"):
        assert not use_packing({"packing": True}, "decoder", leaky)
    assert "does not keep packed documents apart" in caplog.text
    assert not use_packing({"packing": None}, "encoder", leaky)
    assert use_packing({"packing": None}, "decoder", _llama("sdpa"))
    assert not use_packing({"packing": False}, "decoder", _llama("sdpa"))


def _keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def _train(tmp_path, family, name, **overrides):
    base = build_tiny_model(family, ARCH, TEXTS, tmp_path / f"base-{family}", seed=0)
    kind = "encoder" if family == "xlmr" else "decoder"
    metrics = train_lm(base, kind, TEXTS, {**PARAMS, **overrides}, tmp_path / name, seed=0)
    return base, metrics, tmp_path / name / "model"


@pytest.mark.parametrize("family", ["xlmr", "llama"])
def test_fast_loss_trains_like_the_default_and_saves_the_same_checkpoint(tmp_path, family):
    auto = AutoModelForMaskedLM if family == "xlmr" else AutoModelForCausalLM
    _, fast, fast_dir = _train(tmp_path, family, "fast", fast_loss=True, packing=False)
    _, slow, slow_dir = _train(tmp_path, family, "slow", fast_loss=False, packing=False)
    assert fast["fast_loss"] and not slow["fast_loss"]
    assert _keys(fast_dir) == _keys(slow_dir)
    assert (
        json.loads((fast_dir / "config.json").read_text())["architectures"]
        == json.loads((slow_dir / "config.json").read_text())["architectures"]
    )
    a, b = auto.from_pretrained(fast_dir), auto.from_pretrained(slow_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    for key in ("loss_before", "loss", "train_loss"):
        assert abs(fast[key] - slow[key]) < 1e-4, key


def test_packed_decoder_cpt_runs_and_reports_it(tmp_path):
    _, metrics, out = _train(tmp_path, "llama", "packed", fast_loss=True, packing=None)
    assert metrics["packing"] is True and metrics["steps"] == PARAMS["max_steps"]
    assert metrics["loss"] < metrics["loss_before"]
    AutoModelForCausalLM.from_pretrained(out)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    _, one, a = _train(tmp_path, "llama", "ga1", batch_size=8, grad_accum=1, max_steps=2)
    _, two, b = _train(tmp_path, "llama", "ga2", batch_size=4, grad_accum=2, max_steps=2)
    assert one["packing"] and two["packing"]
    x, y = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    for (name, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)
    assert abs(one["train_loss"] - two["train_loss"]) < 1e-4


def test_precision_key_picks_the_trainer_flags_and_refuses_what_cannot_run_here():
    from cmmerge.errors import CmmergeError
    from cmmerge.training.arguments import precision_flags, training_arguments

    assert precision_flags("fp32") == {"bf16": False, "fp16": False}
    assert precision_flags("BF16") == {"bf16": True, "fp16": False}
    if not torch.cuda.is_available():
        assert precision_flags("auto") == {"bf16": False, "fp16": False}
        with pytest.raises(CmmergeError, match="fp16 needs a CUDA GPU"):
            precision_flags("fp16")
    with pytest.raises(CmmergeError, match="precision must be one of auto, fp32, bf16, fp16"):
        precision_flags("fp8")
    args = training_arguments(Path("unused"), {"batch_size": 2, "lr": 1e-3, "precision": "bf16"}, 0)
    assert args.bf16 and not args.fp16


def test_corpus_tokenisation_is_cached_for_the_next_run(tmp_path):
    from cmmerge.models.loading import load_tokenizer
    from cmmerge.training.cpt import tokenize_texts

    base = build_tiny_model("xlmr", ARCH, TEXTS, tmp_path / "base", seed=0)
    tokenizer = load_tokenizer(base)
    folder = tmp_path / "cache" / "tokenized"
    first = tokenize_texts(TEXTS, tokenizer, 24, tmp_path / "cache")
    files = [f for f in folder.glob("*.arrow") if not f.name.startswith("cache-")]
    assert len(files) == 1  # the tokenised corpus (cache-* files: the filter's own)
    stamp = files[0].stat().st_mtime_ns
    again = tokenize_texts(TEXTS, tokenizer, 24, tmp_path / "cache")
    assert files[0].stat().st_mtime_ns == stamp  # loaded, not written again
    assert again["input_ids"] == first["input_ids"]
    assert again["special_tokens_mask"] == first["special_tokens_mask"]
    assert max(len(ids) for ids in first["input_ids"]) <= 24
    shorter = tokenize_texts(TEXTS, tokenizer, 8, tmp_path / "cache")  # another key
    assert max(len(ids) for ids in shorter["input_ids"]) <= 8
    assert len([f for f in folder.glob("*.arrow") if not f.name.startswith("cache-")]) == 2
