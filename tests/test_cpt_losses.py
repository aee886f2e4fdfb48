"""The fast CPT losses equal the models' own: masked-only MLM head, chunked causal-LM loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from cmmerge.errors import CmmergeError
from cmmerge.training.losses import (
    causal_lm_loss,
    chunked_cross_entropy,
    logit_transform,
    masked_lm_loss,
    mlm_head,
)

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def _encoder(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "xlmr":
        return XLMRobertaForMaskedLM(XLMRobertaConfig(**SMALL, pad_token_id=1))
    if family == "bert":
        return BertForMaskedLM(BertConfig(**SMALL))
    if family == "electra":
        return ElectraForMaskedLM(ElectraConfig(**SMALL, embedding_size=16))
    return DistilBertForMaskedLM(
        DistilBertConfig(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        )
    )


def _llama(attn: str = "sdpa", vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return tiny_llama(vocab, attn_implementation=attn)


def _mlm_batch(batch: int = 4, length: int = 12) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    attention[0, 8:] = 0
    attention[2, 5:] = 0
    ids[attention == 0] = 1
    labels = torch.full_like(ids, -100)
    pick = (torch.rand(ids.shape, generator=g) < 0.3) & attention.bool()
    pick[0, 1] = True
    labels[pick] = ids[pick]
    ids = ids.masked_fill(pick, 4)
    return {"input_ids": ids, "attention_mask": attention}, labels


def _grads(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].grad.clone() for n in names}


@pytest.mark.parametrize("family", ["xlmr", "bert", "distilbert", "electra"])
def test_masked_lm_loss_and_gradients_equal_the_default(family):
    model = _encoder(family)
    inputs, labels = _mlm_batch()
    names = [n for n, _ in model.named_parameters()]
    check = [names[0], names[len(names) // 2], names[-1]]

    default = model(**inputs, labels=labels)
    default.loss.backward()
    want = _grads(model, check)
    model.zero_grad()
    loss, outputs = masked_lm_loss(model, inputs, labels)
    loss.backward()
    got = _grads(model, check)

    mask = labels.ne(-100)
    assert outputs.logits.shape == (int(mask.sum()), VOCAB)
    torch.testing.assert_close(outputs.logits, default.logits[mask], atol=1e-5, rtol=1e-5)
    assert abs(loss.item() - default.loss.item()) < 1e-5
    for name in check:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_masked_lm_loss_with_num_items_is_a_sum_over_them():
    model = _encoder("xlmr")
    inputs, labels = _mlm_batch()
    mean, _ = masked_lm_loss(model, inputs, labels)
    n = int(labels.ne(-100).sum())
    scaled, _ = masked_lm_loss(model, inputs, labels, num_items_in_batch=torch.tensor(2 * n))
    assert abs(scaled.item() - mean.item() / 2) < 1e-6


def test_mlm_head_is_found_per_family_and_missing_head_is_an_error():
    bert = _encoder("bert")
    assert mlm_head(bert) is bert.cls
    xlmr = _encoder("xlmr")
    assert mlm_head(xlmr) is xlmr.lm_head
    with pytest.raises(CmmergeError, match="BertModel"):
        from transformers import BertModel

        mlm_head(BertModel(BertConfig(**SMALL)))


def _clm_batch(batch: int = 3, length: int = 20) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    attention[1, 13:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    return {"input_ids": ids, "attention_mask": attention}, labels


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_causal_lm_loss_and_gradients_equal_the_default(chunk_size):
    model = _llama()
    inputs, labels = _clm_batch()
    check = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.norm.weight",
    ]
    default = model(**inputs, labels=labels)
    default.loss.backward()
    want = _grads(model, check)
    model.zero_grad()
    loss = causal_lm_loss(model, inputs, labels, chunk_size=chunk_size)
    loss.backward()
    got = _grads(model, check)
    assert abs(loss.item() - default.loss.item()) < 1e-5
    for name in check:  # the tied embeddings get gradients from the input and the output side
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)


def test_causal_lm_loss_with_num_items_matches_the_default_and_no_grad_works():
    model = _llama()
    inputs, labels = _clm_batch()
    n = torch.tensor(50)
    want = model(**inputs, labels=labels, num_items_in_batch=n).loss
    got = causal_lm_loss(model, inputs, labels, num_items_in_batch=n, chunk_size=5)
    assert abs(got.item() - want.item()) < 1e-5
    with torch.no_grad():
        eval_loss = causal_lm_loss(model, inputs, labels, chunk_size=5)
    assert abs(eval_loss.item() - model(**inputs, labels=labels).loss.item()) < 1e-5


def test_checkpointed_path_for_other_heads_and_logit_transforms():
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, requires_grad=True)
    head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 50))  # not a plain nn.Linear
    targets = torch.randint(0, 50, (23,))
    config = type("C", (), {"final_logit_softcapping": 3.0})()
    cap = logit_transform(config)
    want = F.cross_entropy(cap(head(hidden)), targets, reduction="sum")
    (g_want,) = torch.autograd.grad(want, hidden)
    got = chunked_cross_entropy(hidden, head, targets, chunk_size=4, transform=cap)
    (g_got,) = torch.autograd.grad(got, hidden)
    assert abs(got.item() - want.item()) < 1e-4
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)
    assert logit_transform(LlamaConfig()) is None


def test_fused_linear_cross_entropy_with_bias_and_frozen_weight():
    torch.manual_seed(0)
    hidden = torch.randn(17, 8, requires_grad=True)
    head = nn.Linear(8, 40, bias=True)
    head.weight.requires_grad_(False)
    targets = torch.randint(0, 40, (17,))
    want = F.cross_entropy(head(hidden), targets, reduction="sum")
    g_want = torch.autograd.grad(want, [hidden, head.bias])
    got = chunked_cross_entropy(hidden, head, targets, chunk_size=5)
    g_got = torch.autograd.grad(got * 1.0, [hidden, head.bias])
    assert abs(got.item() - want.item()) < 1e-4
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fast_losses_through_peft_lora_models():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_encoder("xlmr"), LoraConfig(r=4, target_modules=["query", "value"]))
    inputs, labels = _mlm_batch()
    want = model(**inputs, labels=labels).loss
    got, _ = masked_lm_loss(model, inputs, labels)
    assert abs(got.item() - want.item()) < 1e-5
    llama = get_peft_model(_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    inputs, labels = _clm_batch()
    want = llama(**inputs, labels=labels).loss
    assert abs(causal_lm_loss(llama, inputs, labels, chunk_size=8).item() - want.item()) < 1e-5
