"""CPT packing for a decoder that expects BOS (Gemma, Llama): whole documents, each after BOS,
never a block that starts mid-text, and the packed loss equal to the documents' own."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, tiny_llama
from datasets import Dataset

from cmmerge.config.inputs import resolve_model
from cmmerge.models.loading import load_tokenizer
from cmmerge.training.losses import IGNORE_INDEX, causal_lm_loss
from cmmerge.training.packing import (
    add_bos,
    pack_examples,
    packing_collator,
    packing_options,
)

B, P = 0, 2  # tiny-llama's BOS and pad ids
X = IGNORE_INDEX


def test_documents_stay_whole_and_start_with_bos():
    docs = [[B, 11, 12, 13], [B, 21, 22], [31, 32], [B, 41, 42, 43, 44, 45]]
    out = pack_examples({"input_ids": docs}, block_size=6, bos_id=B, pad_id=P)
    blocks = list(zip(out["input_ids"], out["position_ids"], out["labels"], strict=True))
    assert all(len(ids) == 6 for ids, _, _ in blocks)
    # longest first, best fit: [41..45] fills a block, [11..13] leaves 2 (padding), the two
    # short ones share the third; the text without BOS got one
    assert blocks == [
        ([B, 41, 42, 43, 44, 45], [0, 1, 2, 3, 4, 5], [X, 41, 42, 43, 44, 45]),
        ([B, 11, 12, 13, P, P], [0, 1, 2, 3, 0, 1], [X, 11, 12, 13, X, X]),
        ([B, 21, 22, B, 31, 32], [0, 1, 2, 0, 1, 2], [X, 21, 22, X, 31, 32]),
    ]
    seen = []
    for ids, pos, labels in blocks:  # every document whole, after BOS, its BOS never scored
        starts = [i for i, p in enumerate(pos) if p == 0]
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            if ids[a] == P:  # the padding segment: nothing scored
                assert set(ids[a:b]) == {P} and set(labels[a:b]) == {X}
                continue
            assert ids[a] == B and labels[a] == X and labels[a + 1 : b] == ids[a + 1 : b]
            seen.append(ids[a + 1 : b])
    assert sorted(seen) == sorted([[11, 12, 13], [21, 22], [31, 32], [41, 42, 43, 44, 45]])


def test_a_document_longer_than_a_block_is_split_after_bos_and_its_cut_unscored():
    out = pack_examples({"input_ids": [[B, *range(10, 17)]]}, block_size=4, bos_id=B, pad_id=P)
    assert out["input_ids"] == [[B, 10, 11, 12], [B, 13, 14, 15], [B, 16, P, P]]
    assert out["labels"] == [[X, 10, 11, 12], [X, X, 14, 15], [X, X, X, X]]
    assert out["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]


def test_without_bos_the_old_cut_packing_is_kept():
    out = pack_examples({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, block_size=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_packed_loss_is_the_loss_of_each_document_alone(attn):
    torch.manual_seed(0)
    model = tiny_llama(101, attn_implementation=attn)
    g = torch.Generator().manual_seed(0)
    docs = [[B, *torch.randint(3, 101, (n,), generator=g).tolist()] for n in (9, 4, 6, 12, 3)]
    out = pack_examples({"input_ids": docs}, block_size=16, bos_id=B, pad_id=P)
    assert len(out["input_ids"]) == 3  # 13 | 10 + 5 | 7 + 4 (+ padding)
    batch = packing_collator([{k: v[i] for k, v in out.items()} for i in range(3)])
    labels = batch.pop("labels")
    packed = causal_lm_loss(model, batch, labels, chunk_size=7)
    with torch.no_grad():
        total = sum(model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1)
                    for d in docs)  # fmt: skip
    assert packed.item() == pytest.approx(total.item() / sum(len(d) - 1 for d in docs), abs=1e-5)


def test_tiny_llama_gets_bos_packing_and_a_tokenizer_without_bos_gets_it_added():
    folder = resolve_model(compose("cpt", ["model=tiny-llama"]))
    tokenizer = load_tokenizer(folder)
    config = type("Config", (), {"bos_token_id": B})()
    assert tokenizer("hello")["input_ids"][0] == B
    assert packing_options(tokenizer, config) == {"bos_id": B, "pad_id": P}
    no_bos_config = type("Config", (), {"bos_token_id": None})()
    assert packing_options(tokenizer, no_bos_config) == {"bos_id": B, "pad_id": P}  # it adds BOS
    plain = Dataset.from_dict(
        {"input_ids": [[5, 6, 7], [B, 8]], "attention_mask": [[1, 1, 1], [1, 1]]}
    )
    fixed = add_bos(plain, B, max_length=3)
    assert fixed["input_ids"] == [[B, 5, 6], [B, 8]]
    assert fixed["attention_mask"] == [[1, 1, 1], [1, 1]]
    assert add_bos(fixed, B, 3) is fixed  # nothing to add: the same data set


class _NoBos:
    """A tokenizer with a BOS token it does not add (GPT-2 style)."""

    bos_token_id, pad_token_id = 7, None

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def test_bos_is_added_only_where_the_model_expects_it():
    expects = type("Config", (), {"bos_token_id": 7})()
    indifferent = type("Config", (), {"bos_token_id": None})()
    assert packing_options(_NoBos(), expects) == {"bos_id": 7, "pad_id": 7}
    assert packing_options(_NoBos(), indifferent) == {}
