"""Streaming engine: chunking, sharding and threads change nothing; trim scopes; vocabulary
growth; the new methods end to end; and every bad input of issue 3 at the API level."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import save_file
from zoo import legacy_names

import cmmerge.merging.engine as engine
import cmmerge.merging.threads as merge_threads
from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader
from cmmerge.merging import select
from cmmerge.merging.engine import merge_into_base, merge_models
from cmmerge.merging.extract import extract_task_vector, task_vector_cosines
from cmmerge.merging.methods import disjoint_merge, magnitude_trim
from cmmerge.merging.select import (
    keep_count,
    magnitude_bits,
    threshold_of,
    thresholds_over,
    trim_,
    trim_mask,
)

transformers = pytest.importorskip("transformers")


def _tensors(path):
    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _llama(vocab=100, tied=True):
    return tiny_llama(vocab, tied)


def _perturb(model, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eng")
    torch.manual_seed(0)
    model = _llama()
    model.save_pretrained(root / "base")
    _perturb(model, 1).save_pretrained(root / "a")
    _perturb(model, 2).save_pretrained(root / "b")
    model.to(torch.bfloat16).save_pretrained(root / "b16")
    return root


def test_chunks_shards_threads_change_nothing(dirs, tmp_path, monkeypatch):
    kw = dict(density=0.3, sign="sum")
    srcs = [dirs / "a", dirs / "b"]
    merge_models(dirs / "base", srcs, [1.0, 0.6], "ties", 0.8, tmp_path / "ref", **kw)
    ref = _tensors(tmp_path / "ref")
    monkeypatch.setattr(merge_threads, "CHUNK", 333)  # many chunks per tensor, ragged last chunk
    for shard, threads in ((10**9, 1), (5000, 2), (1, 3)):
        out = tmp_path / f"o{shard}"
        merge_models(
            dirs / "base",
            srcs,
            [1.0, 0.6],
            "ties",
            0.8,
            out,
            max_shard_size=shard,
            threads=threads,
            **kw,
        )
        got = _tensors(out)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), (shard, threads)
    assert len(list((tmp_path / "o1").glob("model-*.safetensors"))) == len(ref)
    index = json.loads((tmp_path / "o5000" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ref)


# one task per tensor keeping its deltas / chunk-parallel re-reading, with the two-pass or the
# sampled selection (its sample read from the files block by block)
@pytest.mark.parametrize("cached_trim,min_sampled", [(10**9, 10**9), (0, 10**9), (0, 1000)])
def test_streamed_ties_equals_whole_tensor_math(
    dirs, tmp_path, monkeypatch, cached_trim, min_sampled
):
    monkeypatch.setattr(merge_threads, "CHUNK", 500)
    monkeypatch.setattr(engine, "CACHED_TRIM", cached_trim)
    monkeypatch.setattr(select, "MIN_SAMPLED", min_sampled)
    monkeypatch.setattr(select, "SAMPLE_SIZE", 1000)
    monkeypatch.setattr(select, "SAMPLE_BLOCK", 16)
    monkeypatch.setattr(engine, "SAMPLE_BLOCK", 16)
    base, a, b = (_tensors(dirs / n) for n in ("base", "a", "b"))
    merge_models(
        dirs / "base",
        [dirs / "a", dirs / "b"],
        [1.0, -0.5],
        "ties",
        -0.7,
        tmp_path / "o",
        density=0.2,
        sign="count",
        normalize=False,
    )
    got = _tensors(tmp_path / "o")
    for key in base:
        deltas = [magnitude_trim(x[key] - base[key], 0.2) for x in (a, b)]
        expected = base[key] + -0.7 * torch.from_numpy(
            disjoint_merge(deltas, [1.0, -0.5], False, "count")
        )
        assert torch.allclose(got[key], expected, atol=1e-6), key


def test_sample_read_from_the_files_is_the_sample_of_the_deltas(dirs):
    """The large-tensor route reads its selection sample block by block from the files: the
    same entries ``select`` would take from the computed deltas (bf16 base, f32 sources)."""
    from cmmerge.merging.methods import get_method, resolve_params
    from cmmerge.merging.plan import open_sources, plan_merge

    with CheckpointReader(dirs / "b16") as base:
        sources = open_sources([dirs / "a", dirs / "b"], True, dirs / "b16", False)
        try:
            items, _ = plan_merge(base, dirs / "b16", sources, None)
            merger = engine._Merger(
                base, sources, get_method("ties"), resolve_params("ties", density=0.2),
                [1.0, 1.0], 1.0, None, False,
            )  # fmt: skip
            item = max((it for it in items if it.src_keys), key=lambda it: it.shared)
            assert base.dtype(item.key) == torch.bfloat16
            for start, stop, every in ((0, item.shared, 4), (300, 2000, 5), (7, 7 + 255, 4)):
                want = [select._sample(d, every) for d in merger.deltas(item, start, stop)[1]]
                got = merger.sample(item, start, stop, every)
                assert [g.size for g in got] == [w.size for w in want]
                assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
                assert want[0].size > 0 or stop - start < 256
        finally:
            for src in sources:
                src.reader.close()


def test_trim_scope_model_uses_one_threshold(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_threads, "CHUNK", 700)
    base, a = _tensors(dirs / "base"), _tensors(dirs / "a")
    merge_models(
        dirs / "base",
        [dirs / "a"],
        [1.0],
        "magnitude",
        1.0,
        tmp_path / "o",
        density=0.1,
        trim_scope="model",
    )
    got = _tensors(tmp_path / "o")
    flat = torch.cat([(a[k] - base[k]).reshape(-1) for k in base])
    k = keep_count(0.1, flat.numel())
    kept = sum(int(((got[key] - base[key]) != 0).sum()) for key in base)
    assert abs(kept - k) <= 2  # exactly k up to float rounding of base + delta == base
    cutoff = torch.topk(flat.abs(), k).values.min()
    for key in base:
        delta = a[key] - base[key]
        expected = base[key] + delta * (delta.abs() >= cutoff)
        assert torch.allclose(got[key], expected, atol=1e-7), key
    per_tensor = [int(((got[key] - base[key]) != 0).sum()) / got[key].numel() for key in base]
    assert max(per_tensor) - min(per_tensor) > 0.05  # densities differ across tensors


def _trimmed(part: torch.Tensor, thr, chunk: int) -> torch.Tensor:
    """``trim_`` on a copy of a torch chunk, back as a tensor."""
    return torch.from_numpy(trim_(part.numpy().copy(), thr, chunk))


def test_selection_over_chunks_is_exact_with_ties():
    x = torch.tensor([3.0, -1.0, 2.0, -3.0, 2.0, 2.0, 0.5, -2.0, 1.0, 2.0])
    for k in range(1, 11):
        parts = list(x.split(3))
        thr = threshold_of(parts, k)
        masks = [torch.from_numpy(trim_mask(p, thr, i)) for i, p in enumerate(parts)]
        keep = torch.cat(masks)
        assert int(keep.sum()) == k
        # the largest magnitudes, ties broken by position
        order = sorted(range(10), key=lambda i: (-abs(float(x[i])), i))[:k]
        assert set(keep.nonzero().view(-1).tolist()) == set(order), k
        trimmed = torch.cat([_trimmed(p, thr, i) for i, p in enumerate(parts)])
        assert torch.equal(trimmed, x * keep), k


def test_trim_in_place_equals_the_mask_without_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-8, 8, 5000)
    x[::7] = 0.0
    x[3] = -float("inf")
    parts = list(x.split(1024))
    for k in (1, 17, 2500, 4999, 5000):
        thr = threshold_of(parts, k)
        keep = torch.cat([torch.from_numpy(trim_mask(p, thr, i)) for i, p in enumerate(parts)])
        assert int(keep.sum()) == k
        trimmed = torch.cat([_trimmed(p, thr, i) for i, p in enumerate(parts)])
        assert torch.equal(trimmed, torch.where(keep, x, 0.0)), k


def test_dare_is_seeded_and_rescaled(dirs, tmp_path):
    kw = dict(density=0.5, seed=3)
    for name in ("r1", "r2"):
        merge_models(
            dirs / "base",
            [dirs / "a"],
            [1.0],
            "dare_linear",
            1.0,
            tmp_path / name,
            threads=1 if name == "r1" else 2,
            **kw,
        )
    merge_models(
        dirs / "base", [dirs / "a"], [1.0], "dare_linear", 1.0, tmp_path / "r3", density=0.5, seed=4
    )
    r1, r2, r3 = (_tensors(tmp_path / n) for n in ("r1", "r2", "r3"))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    assert not all(torch.equal(r1[k], r3[k]) for k in r1)
    base, a = _tensors(dirs / "base"), _tensors(dirs / "a")
    key = "model.layers.0.mlp.up_proj.weight"
    delta, got = a[key] - base[key], r1[key] - base[key]
    kept = got != 0
    assert 0.4 < float(kept.float().mean()) < 0.6
    assert torch.allclose(got[kept], 2 * delta[kept], atol=1e-6)  # rescaled by 1/density
    merge_models(
        dirs / "base",
        [dirs / "a", dirs / "b"],
        [1.0, 1.0],
        "dare_ties",
        1.0,
        tmp_path / "dt",
        density=0.5,
        seed=0,
    )


def test_linear_is_weighted_average_and_negation(dirs, tmp_path):
    base, a, b = (_tensors(dirs / n) for n in ("base", "a", "b"))
    merge_models(
        dirs / "base", [dirs / "a", dirs / "b"], [3.0, 1.0], "linear", 1.0, tmp_path / "lin"
    )
    got = _tensors(tmp_path / "lin")
    for key in base:
        assert torch.allclose(got[key], (3 * a[key] + b[key]) / 4, atol=1e-6), key
    merge_models(dirs / "base", [dirs / "a"], [1.0], "tv", -1.0, tmp_path / "neg")
    neg = _tensors(tmp_path / "neg")
    for key in base:
        assert torch.allclose(neg[key], 2 * base[key] - a[key], atol=1e-6), key


def test_bf16_base_merges_in_float32_unless_asked(dirs, tmp_path):
    """A bfloat16 base is merged and written in float32: TV at lambda 1 gives the tuned model to
    float32 precision (bfloat16 output would round lambda * tau away); dtype= still works."""
    a = _tensors(dirs / "a")
    info = merge_models(dirs / "b16", [dirs / "a"], [1.0], "tv", 1.0, tmp_path / "f")
    got = _tensors(tmp_path / "f")
    assert info["dtype"] == "float32" and {t.dtype for t in got.values()} == {torch.float32}
    for key, t in a.items():
        torch.testing.assert_close(got[key], t, rtol=0, atol=1e-7)  # float32 rounding only
    tau = tmp_path / "tau.safetensors"
    extract_task_vector(dirs / "b16", dirs / "a", tau)
    merge_into_base(dirs / "b16", [tau], [1.0], "tv", 1.0, tmp_path / "t")
    for key, t in _tensors(tmp_path / "t").items():
        torch.testing.assert_close(t, a[key], rtol=0, atol=1e-7)
    # bf16 base + bf16 sources -> float32 by default; small lambda * tau survives
    b16_src = tmp_path / "a16"
    transformers.LlamaForCausalLM.from_pretrained(dirs / "a").to(torch.bfloat16).save_pretrained(
        b16_src
    )
    merge_models(dirs / "b16", [b16_src], [1.0], "tv", 0.01, tmp_path / "small")
    base, src = _tensors(dirs / "b16"), _tensors(b16_src)
    key = "model.layers.0.mlp.down_proj.weight"
    want = base[key].float() + 0.01 * (src[key].float() - base[key].float())
    small = _tensors(tmp_path / "small")[key]
    assert small.dtype == torch.float32 and torch.allclose(small, want, rtol=0, atol=1e-8)
    assert not torch.equal(small, base[key].float())
    merge_models(dirs / "b16", [b16_src], [1.0], "tv", 0.01, tmp_path / "b", dtype=torch.bfloat16)
    kept = _tensors(tmp_path / "b")
    assert {t.dtype for t in kept.values()} == {torch.bfloat16}
    assert (kept[key].float() - want).abs().max() > 1e-5  # what bfloat16 output loses


def test_vocabulary_grown_by_cpt(dirs, tmp_path):
    torch.manual_seed(0)
    grown = _llama(vocab=100)
    grown.load_state_dict(_llama(vocab=100).state_dict())  # any weights
    grown = transformers.LlamaForCausalLM.from_pretrained(dirs / "a")
    grown.resize_token_embeddings(104)
    grown.save_pretrained(tmp_path / "grown")
    base, src = _tensors(dirs / "base"), _tensors(tmp_path / "grown")
    emb = "model.embed_tokens.weight"
    tv = tmp_path / "tv.safetensors"
    stats = extract_task_vector(dirs / "base", tmp_path / "grown", tv)
    assert stats["grown"] == {"embed_tokens.weight": 104}
    for how, sources in (("models", [tmp_path / "grown"]), ("tv", [tv])):
        out = tmp_path / how
        fn = merge_models if how == "models" else merge_into_base
        info = fn(dirs / "base", sources, [1.0], "ties", 0.5, out, density=0.5)
        assert info["grown"] == {emb: 104}
        got = _tensors(out)
        assert got[emb].shape == (104, 32)
        assert torch.equal(got[emb][100:], src[emb][100:])  # new rows from the source
        shared = torch.from_numpy(magnitude_trim(src[emb][:100] - base[emb], 0.5))
        assert torch.allclose(got[emb][:100], base[emb] + 0.5 * shared, atol=1e-6)


def test_grown_vocabulary_grows_an_untied_head_too(tmp_path):
    torch.manual_seed(0)
    base_model = _llama(vocab=100, tied=False)
    base_model.save_pretrained(tmp_path / "base")
    grown = _llama(vocab=100, tied=False)
    grown.load_state_dict(base_model.state_dict())
    _perturb(grown, seed=1)
    grown.resize_token_embeddings(104)
    grown.save_pretrained(tmp_path / "grown")
    base, src = _tensors(tmp_path / "base"), _tensors(tmp_path / "grown")
    info = merge_models(tmp_path / "base", [tmp_path / "grown"], [1.0], "tv", 0.5, tmp_path / "out")
    head = "lm_head.weight"
    assert info["grown"] == {"model.embed_tokens.weight": 104, head: 104}
    got = _tensors(tmp_path / "out")
    assert got[head].shape == (104, 32)
    merged = base[head] + 0.5 * (src[head][:100] - base[head])  # the head merges too
    assert torch.allclose(got[head][:100], merged, atol=1e-7)
    assert torch.equal(got[head][100:], src[head][100:])  # its new rows from the source
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded(torch.tensor([[1, 103]])).logits.shape == (1, 2, 104)
    tv = tmp_path / "tv.safetensors"
    extract_task_vector(tmp_path / "base", tmp_path / "grown", tv)
    with pytest.raises(CmmergeError, match="untied head of 100 rows"):
        merge_into_base(tmp_path / "base", [tv], [1.0], "tv", 0.5, tmp_path / "out-tv")
    assert not (tmp_path / "out-tv" / "model.safetensors").exists()


def test_grown_vocabulary_grows_an_mlm_head_bias(tmp_path):
    """A whole-model merge of an MLM grows the head's 1-D bias with the vocabulary; a 1-D
    tensor of another length is still a shape mismatch."""
    torch.manual_seed(0)
    model = _xlmr(vocab=120)
    model.save_pretrained(tmp_path / "base")
    _perturb(model, 2).resize_token_embeddings(124)
    model.save_pretrained(tmp_path / "grown")
    base, src = _tensors(tmp_path / "base"), _tensors(tmp_path / "grown")
    info = merge_models(tmp_path / "base", [tmp_path / "grown"], [1.0], "tv", 0.5, tmp_path / "o")
    assert info["grown"] == {"roberta.embeddings.word_embeddings.weight": 124, "lm_head.bias": 124}
    got = _tensors(tmp_path / "o")["lm_head.bias"]
    want = base["lm_head.bias"] + 0.5 * (src["lm_head.bias"][:120] - base["lm_head.bias"])
    assert torch.allclose(got[:120], want, atol=1e-7) and torch.equal(
        got[120:], src["lm_head.bias"][120:]
    )
    src["lm_head.dense.bias"] = torch.zeros(33)
    save_file(src, str(tmp_path / "grown" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CmmergeError, match=r"shape mismatch for 'lm_head.dense.bias': \(32,\)"):
        merge_models(tmp_path / "base", [tmp_path / "grown"], [1.0], "tv", 0.5, tmp_path / "x")


def test_tied_embedding_stored_under_its_head_alias_is_merged(tmp_path):
    """A checkpoint may keep a tied word embedding only as ``lm_head.decoder.weight``."""
    cfg = transformers.XLMRobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.XLMRobertaForMaskedLM(cfg)
    model.save_pretrained(tmp_path / "tuned-src")
    _perturb(model, 3).save_pretrained(tmp_path / "tuned")
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    emb = "roberta.embeddings.word_embeddings.weight"
    base = _tensors(tmp_path / "tuned-src")
    stored = {("lm_head.decoder.weight" if k == emb else k): v for k, v in base.items()}
    (base_dir / "model.safetensors").unlink()
    save_file(stored, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    tuned = _tensors(tmp_path / "tuned")
    merge_models(base_dir, [tmp_path / "tuned"], [1.0], "ties", 0.5, tmp_path / "out", density=0.3)
    got = _tensors(tmp_path / "out")
    assert emb not in got  # written under the base's own key
    expected = base[emb] + 0.5 * torch.from_numpy(magnitude_trim(tuned[emb] - base[emb], 0.3))
    assert torch.allclose(got["lm_head.decoder.weight"], expected, atol=1e-6)
    shutil.copy(base_dir / "config.json", tmp_path / "out" / "config.json")
    loaded = transformers.XLMRobertaForMaskedLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(loaded.roberta.embeddings.word_embeddings.weight, expected, atol=1e-6)


def _xlmr(vocab=120, **kw):
    cfg = transformers.XLMRobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, **kw,
    )  # fmt: skip
    return transformers.XLMRobertaForMaskedLM(cfg)


def _with_pooler(model, out):
    """Save ``model`` as xlm-roberta-base is stored on the hub: plus ``roberta.pooler.*``."""
    model.save_pretrained(out)
    tensors = _tensors(out)
    g = torch.Generator().manual_seed(9)
    for name in ("weight", "bias"):
        shape = (32, 32) if name == "weight" else (32,)
        tensors[f"roberta.pooler.dense.{name}"] = 0.02 * torch.randn(shape, generator=g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_base_only_tensors_are_carried_over_not_an_abort(tmp_path):
    """Issue 10: a base saved with a pooler that the CPT model does not save used to end the
    merge with "tensor 'pooler.dense.bias' of the base is missing in task_vector.safetensors"."""
    torch.manual_seed(0)
    model = _xlmr()
    base_dir = _with_pooler(model, tmp_path / "base")
    _perturb(model, 1).save_pretrained(tmp_path / "cpt")  # MaskedLM: no pooler
    tau = tmp_path / "tau.safetensors"
    stats = extract_task_vector(base_dir, tmp_path / "cpt", tau)
    pooler = ["roberta.pooler.dense.weight", "roberta.pooler.dense.bias"]
    base, cpt = _tensors(base_dir), _tensors(tmp_path / "cpt")
    for method in ("ties", "tv"):
        out = tmp_path / method
        info = merge_into_base(base_dir, [tau], [1.0], method, 0.5, out, density=0.2)
        assert sorted(info["base_only"]) == sorted(pooler)
        assert set(info["heads_copied"]) == {k for k in base if k.startswith("lm_head.")}
        got = _tensors(out)
        assert set(got) == set(base)
        for key in pooler + sorted(info["heads_copied"]):
            assert torch.equal(got[key], base[key]), key
        key = "roberta.encoder.layer.0.output.dense.weight"
        assert not torch.equal(got[key], base[key])
    assert sorted(stats["base_only"]) == sorted(pooler)  # listed by extract too
    info = merge_models(base_dir, [tmp_path / "cpt"], [1.0], "tv", 1.0, tmp_path / "whole")
    assert sorted(info["base_only"]) == sorted(pooler) and info["heads_copied"] == []
    got = _tensors(tmp_path / "whole")
    for key, t in got.items():  # lambda 1: the CPT model whole, MLM head included
        want = base[key] if key in pooler else cpt[key]
        torch.testing.assert_close(t, want, rtol=0, atol=1e-7)


def test_standalone_merge_merges_the_untied_head(tmp_path):
    """Issue 10: ``merge base=B models=[A] method=task_arithmetic lambda=1.0`` left an untied
    ``lm_head.weight`` at the base's; with one source at lambda 1 every tensor is A's."""
    torch.manual_seed(0)
    base_model = _llama(tied=False)
    base_model.save_pretrained(tmp_path / "base")
    _perturb(base_model, 5).save_pretrained(tmp_path / "a")
    info = merge_models(tmp_path / "base", [tmp_path / "a"], [1.0], "tv", 1.0, tmp_path / "o")
    a, got = _tensors(tmp_path / "a"), _tensors(tmp_path / "o")
    assert "lm_head.weight" in got and set(got) == set(a) and info["n_copied"] == 0
    for key in a:
        torch.testing.assert_close(got[key], a[key], rtol=0, atol=1e-7)
    # a task vector holds the backbone only: the head stays the base's, and is listed
    tau = tmp_path / "tau.safetensors"
    extract_task_vector(tmp_path / "base", tmp_path / "a", tau)
    info = merge_into_base(tmp_path / "base", [tau], [1.0], "tv", 1.0, tmp_path / "t")
    assert info["heads_copied"] == ["lm_head.weight"]
    base = _tensors(tmp_path / "base")
    assert torch.equal(_tensors(tmp_path / "t")["lm_head.weight"], base["lm_head.weight"])


def test_a_source_missing_some_layers_is_refused(dirs, tmp_path):
    """What a source lacks in every layer is carried over; a tensor missing in one layer only
    (a shallower model, a damaged file) is refused."""

    def drop_layer(t):
        for key in [k for k in t if k.startswith("model.layers.1.")]:
            t.pop(key)

    shallow = _copy_with(dirs, tmp_path, "shallow", drop_layer)
    with pytest.raises(CmmergeError, match=r"'layers.1.\S+' of the base is missing in .*shallow"):
        merge_models(dirs / "base", [shallow], [1.0], "tv", 1.0, tmp_path / "o")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_legacy_layernorm_names_align(tmp_path):
    """LayerNorm ``gamma``/``beta`` (TF-era BERT files) match ``weight``/``bias``; the output
    keeps the base's names, which transformers renames on load."""
    cfg = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    model.save_pretrained(tmp_path / "base")
    _perturb(model, 4).save_pretrained(tmp_path / "tuned")
    legacy = legacy_names(_tensors(tmp_path / "base"))
    save_file(legacy, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    stats = extract_task_vector(tmp_path / "base", tmp_path / "tuned", tmp_path / "tau")
    assert stats["base_only"] == [] and "embeddings.LayerNorm.weight" in stats["per_tensor"]
    merge_models(tmp_path / "base", [tmp_path / "tuned"], [1.0], "tv", 1.0, tmp_path / "o")
    got, tuned = _tensors(tmp_path / "o"), _tensors(tmp_path / "tuned")
    assert "bert.embeddings.LayerNorm.gamma" in got
    renamed = dict(zip(legacy_names(dict.fromkeys(tuned)), tuned, strict=True))
    for key, t in got.items():
        torch.testing.assert_close(t, tuned[renamed[key]], rtol=0, atol=1e-7)
    shutil.copy(tmp_path / "base" / "config.json", tmp_path / "o")
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "o")
    torch.testing.assert_close(
        loaded.bert.embeddings.LayerNorm.weight, tuned["bert.embeddings.LayerNorm.weight"]
    )


def test_extract_stats_and_cosines(dirs, tmp_path):
    s1 = extract_task_vector(dirs / "base", dirs / "a", tmp_path / "a.safetensors")
    extract_task_vector(dirs / "base", dirs / "b", tmp_path / "b.safetensors")
    assert {"layer.0", "layer.1", "embed_tokens", "norm"} <= set(s1["per_layer"])
    total = math.sqrt(sum(v["l2"] ** 2 for v in s1["per_layer"].values()))
    assert total == pytest.approx(s1["l2_norm"], rel=1e-9)
    cos = task_vector_cosines(
        [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "a.safetensors"]
    )
    assert cos[0][0] == pytest.approx(1.0) and cos[0][2] == pytest.approx(1.0)
    assert 0.65 < cos[0][1] < 0.76  # tau_b = tau_a + independent noise: cos ~ 1/sqrt(2)
    from cmmerge.reporting.plots import plot_norm_by_layer

    png = plot_norm_by_layer(s1["per_layer"], tmp_path / "n.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- bad input


def _copy_with(dirs, tmp_path, name, change):
    out = tmp_path / name
    out.mkdir()
    shutil.copy(dirs / "a" / "config.json", out)
    tensors = _tensors(dirs / "a")
    change(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_source_is_named(dirs, tmp_path, value):
    def poison(t):
        t["model.layers.1.mlp.down_proj.weight"][3, 4] = value

    bad = _copy_with(dirs, tmp_path, "nan", poison)
    for method in ("tv", "ties", "dare_ties"):
        with pytest.raises(
            CmmergeError,
            match=r"non-finite .*'model.layers.1.mlp.down_proj"
            r".weight' of .*nan \(allow_nonfinite=true",
        ):
            merge_models(
                dirs / "base", [dirs / "a", bad], [1, 1], method, 1.0, tmp_path / "o", density=0.5
            )
        assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    merge_models(dirs / "base", [bad], [1.0], "tv", 1.0, tmp_path / "ok", allow_nonfinite=True)


def test_missing_tensor_and_architecture(dirs, tmp_path):
    bad = _copy_with(
        dirs, tmp_path, "missing", lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")
    )
    with pytest.raises(
        CmmergeError, match="'layers.1.self_attn.q_proj.weight' of the base is missing in .*missing"
    ):
        merge_models(dirs / "base", [bad], [1.0], "tv", 1.0, tmp_path / "o")
    other = _copy_with(dirs, tmp_path, "bert", lambda t: None)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(CmmergeError, match="architectures differ: .* 'llama' but .* 'mistral'"):
        merge_models(dirs / "base", [other], [1.0], "tv", 1.0, tmp_path / "o")
    with pytest.raises(CmmergeError, match="architectures differ"):
        extract_task_vector(dirs / "base", other, tmp_path / "x.safetensors")


def test_truncated_corrupt_and_pickle_checkpoints(dirs, tmp_path):
    trunc = tmp_path / "trunc"
    shutil.copytree(dirs / "a", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CmmergeError, match="truncated"):
        merge_models(dirs / "base", [trunc], [1.0], "tv", 1.0, tmp_path / "o")
    (trunc / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CmmergeError, match="corrupt"):
        merge_models(dirs / "base", [trunc], [1.0], "tv", 1.0, tmp_path / "o")

    pkl = tmp_path / "pkl"
    pkl.mkdir()
    shutil.copy(dirs / "a" / "config.json", pkl)
    torch.save(_tensors(dirs / "a"), pkl / "pytorch_model.bin")
    with pytest.raises(CmmergeError, match="pickle checkpoint: refused .*allow_pickle=true"):
        merge_models(dirs / "base", [pkl], [1.0], "tv", 1.0, tmp_path / "o")
    merge_models(dirs / "base", [pkl], [1.0], "tv", 1.0, tmp_path / "p", allow_pickle=True)
    merge_models(dirs / "base", [dirs / "a"], [1.0], "tv", 1.0, tmp_path / "s")
    got, ref = _tensors(tmp_path / "p"), _tensors(tmp_path / "s")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_bad_parameters(dirs, tmp_path):
    for bad in (0, -0.1, 1.01, float("nan")):
        with pytest.raises(CmmergeError, match="density must be in"):
            merge_models(
                dirs / "base", [dirs / "a"], [1.0], "ties", 1.0, tmp_path / "o", density=bad
            )
    with pytest.raises(CmmergeError, match="nothing to merge"):
        merge_models(dirs / "base", [], [], "ties", 1.0, tmp_path / "o", density=0.5)
    with pytest.raises(CmmergeError, match="trim_scope must be one of tensor, model"):
        merge_models(
            dirs / "base",
            [dirs / "a"],
            [1.0],
            "ties",
            1.0,
            tmp_path / "o",
            density=0.5,
            trim_scope="layer",
        )
    assert not (tmp_path / "o").exists()


def _brute_threshold(x: torch.Tensor, k: int) -> tuple[int, int]:
    """(k-th largest magnitude bit pattern, how many entries equal to it are kept)."""
    bits = sorted(magnitude_bits(x).tolist(), reverse=True)
    t = bits[k - 1]
    return t, k - sum(1 for b in bits if b > t)


@pytest.mark.parametrize("data", ["normal", "bf16-steps", "rigged-sample"])
def test_sampled_selection_equals_two_passes_and_brute_force(data, monkeypatch):
    g = torch.Generator().manual_seed(1)
    n = 200_000
    if data == "normal":
        x = torch.randn(n, generator=g) * 1e-3
    elif data == "bf16-steps":  # differences of bf16 values: few distinct values, many ties
        a = torch.randn(n, generator=g).to(torch.bfloat16)
        b = (a.float() + 0.01 * torch.randn(n, generator=g)).to(torch.bfloat16)
        x = b.float() - a.float()
    else:  # the sampled blocks (one in 16 of 256 entries) are huge: the estimate misses
        x = torch.randn(n, generator=g) * 1e-3
        x.view(-1)[: n // 256 * 256].view(-1, 256)[::16] *= 1e6
    parts = list(x.split(30_000))
    monkeypatch.setattr(select, "MAX_WINDOW", 1 << 22)  # this sample is small: wide bounds
    monkeypatch.setattr(select, "MIN_SAMPLED", 1000)
    fallbacks = []
    real = select._two_pass
    monkeypatch.setattr(select, "_two_pass", lambda *a: fallbacks.append(1) or real(*a))
    for k in (1, 1000, 40_000, 123_457, n - 1):
        fallbacks.clear()
        sampled = thresholds_over(lambda c: [parts[c]], len(parts), [k], total=n)[0]
        if data != "rigged-sample" and k in (40_000, 123_457):
            assert not fallbacks, "the sample's window missed a central quantile"
        two_pass = thresholds_over(lambda c: [parts[c]], len(parts), [k])[0]
        assert sampled == two_pass, (data, k)
        assert (sampled.bits, sampled.keep_equal) == _brute_threshold(x, k), (data, k)
        kept = np.concatenate([trim_mask(p, sampled, i) for i, p in enumerate(parts)])
        assert int(kept.sum()) == k


def test_sampled_selection_falls_back_when_the_window_misses(monkeypatch):
    monkeypatch.setattr(select, "MAX_WINDOW", 4)  # no sampled window is narrow enough
    monkeypatch.setattr(select, "MIN_SAMPLED", 1000)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    parts = list(x.split(7_000))
    calls = []
    real = select._two_pass
    monkeypatch.setattr(select, "_two_pass", lambda *a: calls.append(1) or real(*a))
    thr = thresholds_over(
        lambda c: [parts[c], parts[c] * 2], len(parts), [5000, 5000], total=x.numel()
    )
    assert calls, "the fallback did not run"
    for t, y in zip(thr, (x, x * 2), strict=True):
        assert (t.bits, t.keep_equal) == _brute_threshold(y, 5000)


def test_window_counts_equal_a_brute_force_count_at_every_edge():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g)
    x[:40] = float("nan")
    x[40:80] = float("-inf")
    x[80:300] = (x[80:300] * 4).round() / 4  # ties
    sparse = torch.zeros(5000)  # most entries in one window: binned, not picked out
    sparse[::7] = torch.randn(715, generator=g)
    for y in (x, sparse):
        bits = magnitude_bits(y).tolist()
        mid = sorted(bits)[2500]
        windows = [(mid - 300_000, 600_000), (mid, 1), (0, 1 << 16), (0x7FFFFFFF - 50, 1 << 19)]
        for lo, width in windows:
            above, offsets, counts = select.window_counts(y, lo, width)
            inside = sorted(b - lo for b in bits if lo <= b < lo + width)
            want = {o: inside.count(o) for o in inside}
            assert above == sum(1 for b in bits if b >= lo + width), (lo, width)
            assert dict(zip(offsets.tolist(), counts.tolist(), strict=True)) == want, (lo, width)
            assert offsets.dtype == counts.dtype == np.int32
