"""Verbaliser scoring is the exact log-likelihood; shots are drawn per label with the seed."""

from __future__ import annotations

import torch
from test_tiny import ARCH, TEXTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from cmmerge.evaluation.prompting import draw_shots, score_verbalizers
from cmmerge.models.tiny import build_tiny_model


def test_scores_equal_the_summed_token_log_probs(tmp_path):
    folder = build_tiny_model("llama", ARCH, TEXTS, tmp_path / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = ["yaar ye movie", "que bonito dia hoy lol"]
    verbs = [" bad yaar", " encanta"]
    scores = score_verbalizers(model, tok, prompts, verbs, batch_size=3)
    for i, p in enumerate(prompts):
        for j, v in enumerate(verbs):
            ids = tok(p)["input_ids"] + tok(v, add_special_tokens=False)["input_ids"]
            n = len(tok(v, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
            expected = sum(logp[k - 1, ids[k]].item() for k in range(len(ids) - n, len(ids)))
            assert abs(scores[i, j] - expected) < 1e-4


def test_draw_shots_cycles_labels_and_is_seeded():
    texts = [f"t{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    a = draw_shots(texts, labels, 6, seed=1)
    assert sorted(y for _, y in a) == [0, 0, 1, 1, 2, 2]
    assert a == draw_shots(texts, labels, 6, seed=1) and a != draw_shots(texts, labels, 6, 2)
    assert draw_shots(texts, labels, 0, 1) == []
