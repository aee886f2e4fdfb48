"""Verbaliser scoring is the exact log-likelihood, computed only at the verbaliser positions;
length normalisation; prompts longer than max_length lose their middle; shots per label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import compose, tiny_llama
from test_tiny import ARCH, TEXTS
from transformers import AutoTokenizer

from cmmerge.errors import CmmergeError
from cmmerge.evaluation.prompting import (
    draw_shots,
    encode_rows,
    fit_prompt,
    score_prompts,
    score_verbalizers,
)
from cmmerge.models.tiny import build_tiny_model

PROMPTS = ["yaar ye movie", "que bonito dia hoy lol kya bakwas hai bro", "bad"]
VERBS = [" bad yaar", " encanta", " this is so bad yaar"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tokenizer trained on TEXTS and conftest's tiny Llama (random weights, seed 0)."""
    folder = build_tiny_model("llama", ARCH, TEXTS, tmp_path_factory.mktemp("m") / "m", seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    return tiny_llama(len(tok)).eval(), tok


def direct(model, ids: list[int], n: int) -> float:
    """sum_j log p(v_j | prefix) from the full [length, vocab] log-softmax of one sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[k - 1, ids[k]].item() for k in range(len(ids) - n, len(ids)))


def test_scores_equal_the_full_log_softmax_and_only_verbaliser_rows_are_computed(lm):
    model, tok = lm
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: shapes.append(out.shape))
    try:
        summed = score_verbalizers(model, tok, PROMPTS, VERBS, batch_size=4)
        mean = score_verbalizers(model, tok, PROMPTS, VERBS, batch_size=2, normalize=True)
    finally:
        hook.remove()
    lengths = [len(tok(v, add_special_tokens=False)["input_ids"]) for v in VERBS]
    for i, p in enumerate(PROMPTS):
        for j, v in enumerate(VERBS):
            n = lengths[j]
            ids = tok(p)["input_ids"] + tok(v, add_special_tokens=False)["input_ids"]
            expected = direct(model, ids, n)
            assert summed[i, j] == pytest.approx(expected, abs=1e-4)
            assert mean[i, j] == pytest.approx(expected / n, abs=1e-4)
    # logits only for the positions that predict verbaliser tokens (+1), never every position
    longest = max(len(tok(p)["input_ids"]) for p in PROMPTS) + max(lengths)
    assert shapes and all(s[1] <= max(lengths) + 1 < longest for s in shapes)
    assert lengths[2] > 1 and summed.shape == (3, 3)


def test_normalised_scores_can_change_the_prediction(lm):
    model, tok = lm
    summed = score_verbalizers(model, tok, PROMPTS, VERBS)
    mean = score_verbalizers(model, tok, PROMPTS, VERBS, normalize=True)
    lengths = np.array([len(tok(v, add_special_tokens=False)["input_ids"]) for v in VERBS])
    np.testing.assert_allclose(mean, summed / lengths, rtol=1e-12)
    # random weights: the 1-token verbaliser wins every sum, the 2-token one every mean
    assert summed.argmax(-1).tolist() == [1, 1, 1] and mean.argmax(-1).tolist() == [0, 0, 0]


def test_a_prompt_longer_than_max_length_keeps_bos_and_its_end(lm):
    model, tok = lm
    prompt = " ".join(TEXTS[:5])
    p_ids = tok(prompt)["input_ids"]
    v_ids = tok(" this is so bad yaar", add_special_tokens=False)["input_ids"]
    n = len(v_ids)
    assert p_ids[0] == tok.bos_token_id and len(p_ids) > 12
    for max_length in (n + 1, n + 2, n + 6):  # the verbaliser fills all but 1, 2, 6 tokens
        rows, truncated = encode_rows(tok, [prompt], [" this is so bad yaar"], max_length)
        ids, n_verb = rows[0]
        assert truncated == 1 and n_verb == n and len(ids) == max_length
        room = max_length - n
        kept = p_ids[-1:] if room == 1 else p_ids[:1] + p_ids[-(room - 1) :]
        assert ids == kept + v_ids
        score, _ = score_prompts(model, tok, [prompt], [" this is so bad yaar"], 1, max_length)
        assert score[0, 0] == pytest.approx(direct(model, ids, n), abs=1e-4)
    assert fit_prompt([1, 2, 3], 2, 8, 1) == [1, 2, 3]  # fits: unchanged
    with pytest.raises(CmmergeError, match="prompt.max_length=5"):
        encode_rows(tok, [prompt], [" this is so bad yaar"], n)  # no room for any prompt token


def test_prompt_stage_records_the_scoring_and_keeps_normalised_runs_apart(tmp_path):
    common = ["model=tiny-llama", f"run.root={tmp_path}", "run.name=p", "prompt.max_length=24"]
    plain = prompt_run(common)
    norm = prompt_run([*common, "prompt.normalize=true"])
    assert plain["config"]["normalize"] is False and norm["config"]["normalize"] is True
    assert norm["scoring"] == "mean log-prob per verbaliser token"
    assert plain["prompts_truncated"] > 0 and plain["device"] == "cpu"
    assert plain["dtype"] == "float32"
    from cmmerge.config.specs import PromptSpec

    names = {
        PromptSpec.from_config(compose("prompt", o)).folder_id
        for o in (common, [*common, "prompt.normalize=true"])
    }
    assert names == {
        "tiny-llama-base-sentiment-en-hi-k0-s0-607fe2",  # max_length 24 is not the default
        "tiny-llama-base-sentiment-en-hi-k0-s0-norm-607fe2",
    }
    on_disk = (tmp_path / "p" / "prompt").iterdir()
    assert {p.name for p in on_disk if not p.name.startswith(".")} == names
    for name in names:
        metrics = json.loads((tmp_path / "p" / "prompt" / name / "metrics.json").read_text())
        assert metrics["n"] == 300


def prompt_run(overrides: list[str]) -> dict:
    from cmmerge.commands import prompt

    return prompt.run(compose("prompt", overrides))


def test_draw_shots_cycles_labels_and_is_seeded():
    texts = [f"t{i}" for i in range(30)]
    labels = [i % 3 for i in range(30)]
    a = draw_shots(texts, labels, 6, seed=1)
    assert sorted(y for _, y in a) == [0, 0, 1, 1, 2, 2]
    assert a == draw_shots(texts, labels, 6, seed=1) and a != draw_shots(texts, labels, 6, 2)
    assert draw_shots(texts, labels, 0, 1) == []


@pytest.mark.gpu
def test_scoring_on_the_gpu_matches_the_cpu(lm):
    from cmmerge.evaluation.prompting import inference_device, inference_dtype

    model, tok = lm
    device = inference_device("auto")
    assert device.type == "cuda"
    want = score_verbalizers(model, tok, PROMPTS, VERBS, batch_size=2)
    got = score_verbalizers(model.to(device), tok, PROMPTS, VERBS, batch_size=2)
    np.testing.assert_allclose(got, want, atol=1e-3)
    half = model.to(dtype=inference_dtype("auto", device))
    assert (score_verbalizers(half, tok, PROMPTS, VERBS).argmax(-1) == want.argmax(-1)).all()
    model.to("cpu", dtype=torch.float32)
