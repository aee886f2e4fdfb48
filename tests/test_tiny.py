"""Tiny offline models: deterministic, loadable, right special tokens and tied embeddings."""

from __future__ import annotations

import hashlib

import pytest
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from cmmerge.models.loading import model_kind
from cmmerge.models.tiny import build_tiny_model

ARCH = dict(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_positions=64,
    vocab_size=300,
)
TEXTS = [
    "yaar ye movie bahut acchi thi",
    "kya bakwas hai bro",
    "me encanta esta cancion lol",
    "this is so bad yaar",
    "que bonito dia hoy",
] * 40


def _digest(folder, name):
    return hashlib.sha256((folder / name).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "family,auto_cls,kind",
    [("xlmr", AutoModelForMaskedLM, "encoder"), ("llama", AutoModelForCausalLM, "decoder")],
)
def test_tiny_model_is_deterministic_and_loads(tmp_path, family, auto_cls, kind):
    a = build_tiny_model(family, ARCH, TEXTS, tmp_path / "a", seed=1)
    b = build_tiny_model(family, ARCH, TEXTS, tmp_path / "b", seed=1)
    c = build_tiny_model(family, ARCH, TEXTS, tmp_path / "c", seed=2)
    for name in ("tokenizer.json", "model.safetensors"):
        assert _digest(a, name) == _digest(b, name)
    assert _digest(a, "model.safetensors") != _digest(c, "model.safetensors")
    assert model_kind(a) == kind
    model = auto_cls.from_pretrained(a)
    tokenizer = AutoTokenizer.from_pretrained(a)
    assert tokenizer.pad_token_id is not None and len(tokenizer) <= ARCH["vocab_size"]
    ids = tokenizer("yaar me encanta")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    if family == "xlmr":
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.mask_token_id is not None
    else:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
