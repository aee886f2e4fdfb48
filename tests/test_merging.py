"""Merge math, streaming checkpoint I/O and the merge engine, on tiny random models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import (
    CheckpointReader,
    ShardedWriter,
    StreamingFileWriter,
    sha256_file,
)
from cmmerge.merging.engine import merge_into_base, merge_models
from cmmerge.merging.extract import extract_task_vector
from cmmerge.merging.keys import (
    TIED_BY_DEFAULT,
    backbone_key,
    backbone_map,
    backbone_prefix,
    layer_template,
)
from cmmerge.merging.methods import (
    MERGE_METHODS,
    combine,
    get_method,
    magnitude_trim,
    task_arithmetic,
    ties,
)

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- pure math


def _f32(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_magnitude_trim_keeps_exactly_k_largest():
    x = np.random.default_rng(0).standard_normal((37, 29), dtype=np.float32)
    for density in (0.05, 0.2, 0.5, 0.9):
        k = max(1, int(density * x.size))
        out = magnitude_trim(x, density)
        kept = out != 0
        assert out.shape == x.shape
        assert int(kept.sum()) == k
        assert np.array_equal(out[kept], x[kept])  # kept values unchanged
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()  # and they are the largest
    assert magnitude_trim(x, 1.0) is x
    # mergekit's k = max(1, int(density * n)); ties at the threshold keep the lowest indices
    assert np.array_equal(
        magnitude_trim(np.ones(10, np.float32), 0.05), np.eye(10, dtype=np.float32)[0]
    )
    assert np.array_equal(
        magnitude_trim(np.ones(10, np.float32), 0.35), np.array([1.0] * 3 + [0.0] * 7)
    )


# d1 = [4, -2.5, 1, -3, 0.5, 2], w1 = 2; d2 = [-1, 3, 2, -1.5, -6, -4], w2 = 0.5; density 0.5
# keeps 3 of 6: trim(d1) = [4, -2.5, 0, -3, 0, 0], trim(d2) = [0, 3, 0, 0, -6, -4]
# weighted: w1*t1 = [8, -5, 0, -6, 0, 0], w2*t2 = [0, 1.5, 0, 0, -3, -2]
D1 = _f32([4.0, -2.5, 1.0, -3.0, 0.5, 2.0])
D2 = _f32([-1.0, 3.0, 2.0, -1.5, -6.0, -4.0])
W = [2.0, 0.5]


def test_ties_hand_computed_sign_sum():
    # sum = [8, -3.5, 0, -6, -3, -2] -> elected [+, -, +, -, -, -]
    # agree1 = [1, 1, 0, 1, 0, 0] (zeros never agree), agree2 = [0, 0, 0, 0, 1, 1]
    # merged = [8, -5, 0, -6, -3, -2]; divisor = [2, 2, 0->1, 2, .5, .5]
    got = ties([D1, D2], W, density=0.5, sign="sum", normalize=False)
    assert np.array_equal(got, _f32([8.0, -5.0, 0.0, -6.0, -3.0, -2.0]))
    got = ties([D1, D2], W, density=0.5, sign="sum", normalize=True)
    assert np.array_equal(got, _f32([4.0, -2.5, 0.0, -3.0, -6.0, -4.0]))


def test_ties_hand_computed_sign_count():
    # sign counts = [1, 0, 0, -1, -1, -1] -> elected [+, +, +, -, -, -] (0 counts as +)
    # agree1 = [1, 0, 0, 1, 0, 0], agree2 = [0, 1, 0, 0, 1, 1]
    # merged = [8, 1.5, 0, -6, -3, -2]; divisor = [2, .5, 1, 2, .5, .5]
    got = ties([D1, D2], W, density=0.5, sign="count", normalize=False)
    assert np.array_equal(got, _f32([8.0, 1.5, 0.0, -6.0, -3.0, -2.0]))
    got = ties([D1, D2], W, density=0.5, sign="count", normalize=True)
    assert np.array_equal(got, _f32([4.0, 3.0, 0.0, -3.0, -6.0, -4.0]))


def test_task_arithmetic_hand_computed():
    # 2*d1 + 0.5*d2 = [7.5, -3.5, 3, -6.75, -2, 2]; normalized: / 2.5
    expected = _f32([7.5, -3.5, 3.0, -6.75, -2.0, 2.0])
    assert np.array_equal(task_arithmetic([D1, D2], W), expected)
    got = task_arithmetic([D1, D2], W, normalize=True)
    assert np.allclose(got, _f32([3.0, -1.4, 1.2, -2.7, -0.8, 0.8]), atol=1e-6)
    # weights summing to ~0 are not divided by
    assert np.array_equal(task_arithmetic([D1, D2], [1.0, -1.0], normalize=True), D1 - D2)


def test_registry_and_combine_defaults():
    assert MERGE_METHODS["tv"] is MERGE_METHODS["task_arithmetic"]
    assert get_method("ties").default_normalize is True
    assert get_method("tv").default_normalize is False
    assert set(get_method("ties").params) == {"density", "sign", "trim_scope"}
    assert np.array_equal(combine("tv", [D1, D2], W), task_arithmetic([D1, D2], W))
    assert np.array_equal(
        combine("ties", [D1, D2], W, density=0.5),  # normalize defaults to True, sign to sum
        _f32([4.0, -2.5, 0.0, -3.0, -6.0, -4.0]),
    )
    # density is ignored by task_arithmetic so one sweep grid can serve every method
    assert np.array_equal(combine("tv", [D1, D2], W, density=0.2), task_arithmetic([D1, D2], W))


def _reference_ties(deltas, weights, density, sign, normalize):
    """Element by element, as the TIES paper describes it."""
    n = deltas[0].size
    k = max(1, int(density * n))
    trimmed = []
    for d in deltas:
        values = d.reshape(-1).tolist()
        if density >= 1:
            trimmed.append(values)
            continue
        order = sorted(range(n), key=lambda i: -abs(values[i]))
        keep = set(order[:k])
        trimmed.append([v if i in keep else 0.0 for i, v in enumerate(values)])
    out = []
    for j in range(n):
        weighted = [w * t[j] for w, t in zip(weights, trimmed, strict=True)]
        if sign == "sum":
            vote = sum(weighted)
        else:
            vote = sum((v > 0) - (v < 0) for v in weighted)
        elected = 1 if vote >= 0 else -1
        agree = [i for i, v in enumerate(weighted) if v != 0 and (v > 0) == (elected > 0)]
        total = sum(weighted[i] for i in agree)
        if normalize:
            divisor = sum(weights[i] for i in agree)
            total /= divisor if divisor != 0 else 1
        out.append(total)
    return np.array(out, dtype=np.float64).reshape(deltas[0].shape)


@pytest.mark.parametrize("density", [round(0.1 * i, 1) for i in range(1, 11)])
def test_ties_matches_reference(density):
    g = np.random.default_rng(int(density * 100))
    deltas = [g.standard_normal((9, 11), dtype=np.float32) for _ in range(3)]
    weights = [1.0, 0.7, 0.3]
    for sign in ("sum", "count"):
        for normalize in (True, False):
            got = ties(deltas, weights, density=density, sign=sign, normalize=normalize)
            ref = _reference_ties(deltas, weights, density, sign, normalize)
            assert np.allclose(got.astype(np.float64), ref, atol=1e-5), (sign, normalize)


def test_bad_method_and_density():
    with pytest.raises(CmmergeError, match="unknown merge method 'x'; choose one of: "):
        get_method("x")
    with pytest.raises(CmmergeError, match="unknown merge method"):
        combine("dare_magic", [D1], [1.0])
    for bad in (0, 1.5):
        with pytest.raises(CmmergeError, match=f"density must be in \\(0, 1\\], got {bad}"):
            combine("ties", [D1, D2], W, density=bad)
    with pytest.raises(CmmergeError, match="sign"):
        combine("ties", [D1, D2], W, density=0.5, sign="vote")


# ---------------------------------------------------------------- checkpoint I/O


def test_sharded_writer_writes_index_and_reads_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"layer.{i}.weight": torch.randn(10, 10, generator=g) for i in range(6)}
    tensors["half"] = torch.randn(7, generator=g).to(torch.bfloat16)
    tensors["ids"] = torch.arange(5)
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    with ShardedWriter(tmp_path, layout, max_shard_size=1000) as writer:  # 400 bytes per layer
        for key, t in reversed(tensors.items()):  # any order, whole or in chunks
            if t.numel() == 100:
                writer.write(key, t.reshape(-1)[60:], 60)
                writer.write(key, t.reshape(-1)[:60], 0)
            else:
                writer.write(key, t)
        files = writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) == 4 and files[-1].name == "model.safetensors.index.json"
    assert files[0].name == "model-00001-of-00003.safetensors"
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert not list(tmp_path.glob(".tmp*")) and not (tmp_path / "model.safetensors").exists()
    with CheckpointReader(tmp_path) as reader:
        # file order: shard by shard (shards follow add order), by offset inside a shard
        assert sorted(reader.keys()) == sorted(tensors)
        assert reader.keys()[:2] == ["layer.0.weight", "layer.1.weight"]
        assert reader.metadata == {"format": "pt"}
        for key, t in tensors.items():
            assert reader.shape(key) == tuple(t.shape) and reader.dtype(key) == t.dtype
            assert torch.equal(reader.get(key), t)
    # a second write with one shard replaces the sharded layout
    with ShardedWriter(tmp_path, {"a": (torch.float32, (2,))}) as writer:
        writer.write("a", torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert len(sha256_file(tmp_path / "model.safetensors")) == 64


def test_sharded_writer_abort_leaves_nothing(tmp_path):
    layout = {"a": (torch.float32, (8,)), "b": (torch.float32, (8,))}
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, layout, max_shard_size=10) as w:
        w.write("a", torch.ones(8))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CmmergeError, match="not fully written"), ShardedWriter(tmp_path, layout):
        pass  # closing with tensors never written
    assert list(tmp_path.iterdir()) == []


def test_streaming_file_writer_mixed_dtypes(tmp_path):
    tensors = {
        "mask": torch.tensor([True, False, True]),
        "h": torch.randn(3, 5).half(),
        "w": torch.randn(4, 4),
        "ids": torch.arange(3),
        "scalar": torch.tensor(2.5),
    }
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    path = tmp_path / "tv.safetensors"
    with StreamingFileWriter(path, layout, {"base": "x"}) as writer:
        for key in reversed(list(tensors)):
            writer.write(key, tensors[key])
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"base": "x"}
        for key, t in tensors.items():
            assert torch.equal(f.get_tensor(key), t)


def test_reader_errors(tmp_path):
    with pytest.raises(CmmergeError, match="not found: .*nowhere"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CmmergeError, match="no model.safetensors or model.safetensors.index.json"):
        CheckpointReader(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CmmergeError, match="cannot read safetensors file .*bad"):
        CheckpointReader(tmp_path / "bad")


# ---------------------------------------------------------------- keys and engine


def _xlmr():
    cfg = transformers.XLMRobertaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40,
    )  # fmt: skip
    return transformers.XLMRobertaForMaskedLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def xlmr_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlmr")
    torch.manual_seed(0)
    model = _xlmr()
    model.save_pretrained(root / "base", max_shard_size="20KB")  # sharded, with an index
    _perturb(model, 1).save_pretrained(root / "tuned")
    model.roberta.save_pretrained(root / "bare")  # AutoModel-style keys: embeddings.*, encoder.*
    return root


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = _llama()
    model.save_pretrained(root / "base")
    _perturb(model, 2).save_pretrained(root / "tuned")
    _perturb(model, 3).save_pretrained(root / "tuned2")
    return root


def _tensors(path):
    with CheckpointReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def test_backbone_keys(xlmr_dirs, llama_dirs):
    assert backbone_prefix(xlmr_dirs / "base") == "roberta"
    assert backbone_prefix(llama_dirs / "base") == "model"
    assert backbone_key("roberta.encoder.layer.0.output.dense.weight", "roberta") == (
        "encoder.layer.0.output.dense.weight"
    )
    assert backbone_key("embeddings.word_embeddings.weight", "roberta") == (
        "embeddings.word_embeddings.weight"
    )
    for head in (
        "lm_head.weight",
        "cls.predictions.bias",
        "classifier.dense.weight",
        "score.weight",
    ):
        assert backbone_key(head, "model") is None
    assert backbone_key("model.norm.weight", "model") == "norm.weight"
    assert backbone_key("norm.weight", "model") == "norm.weight"
    assert backbone_key("bert.encoder.layer.0.output.LayerNorm.gamma", "bert") == (
        "encoder.layer.0.output.LayerNorm.weight"
    )
    keys = ["bert.embeddings.word_embeddings.weight", "cls.predictions.transform.LayerNorm.beta",
            "cls.predictions.decoder.weight", "cls.seq_relationship.bias"]  # fmt: skip
    assert backbone_map(keys, "bert", heads=True) == {
        "embeddings.word_embeddings.weight": keys[0],
        "cls.predictions.transform.LayerNorm.bias": keys[1],
        "cls.predictions.decoder.weight": keys[2],
        "cls.seq_relationship.bias": keys[3],
    }
    # a tied output embedding stored alone stands for the input embedding, never twice
    assert backbone_map(["lm_head.weight", "model.norm.weight"], "model", heads=True) == {
        "embed_tokens.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
    }
    assert layer_template("layers.3.mlp.experts.12.w1") == "layers.#.mlp.experts.#.w1"
    assert layer_template("pooler.dense.weight") is None


def test_known_architecture_tables_match_transformers():
    from transformers import AutoConfig

    for model_type, tied in TIED_BY_DEFAULT.items():
        assert AutoConfig.for_model(model_type).tie_word_embeddings is tied, model_type


def test_xlmr_round_trip(xlmr_dirs, tmp_path):
    assert (xlmr_dirs / "base" / "model.safetensors.index.json").exists()
    stats = extract_task_vector(xlmr_dirs / "base", xlmr_dirs / "tuned", tmp_path)
    base, tuned = _tensors(xlmr_dirs / "base"), _tensors(xlmr_dirs / "tuned")
    backbone = [k for k in base if k.startswith("roberta.")]
    assert stats["n_tensors"] == len(backbone)
    assert stats["n_params"] == sum(base[k].numel() for k in backbone)
    assert stats["skipped_head_keys"]["base_only"] == []
    assert stats["skipped_head_keys"]["both"] == [k for k in base if k.startswith("lm_head.")]
    tv = _tensors(tmp_path / "task_vector.safetensors")
    assert set(tv) == {k[len("roberta.") :] for k in backbone}
    l2 = torch.linalg.vector_norm(tv["encoder.layer.1.output.dense.weight"])
    assert stats["per_tensor"]["encoder.layer.1.output.dense.weight"]["l2"] == pytest.approx(
        float(l2), rel=1e-5
    )
    assert stats["per_tensor"]["encoder.layer.1.output.dense.weight"]["frac_changed"] == 1.0

    out = tmp_path / "merged"
    m = merge_into_base(
        xlmr_dirs / "base", [tmp_path / "task_vector.safetensors"], [1.0], "task_arithmetic",
        1.0, out, max_shard_size=30_000,
    )  # fmt: skip
    assert m["n_merged"] == len(backbone) and m["n_copied"] == len(base) - len(backbone)
    assert m["tau_keys_missing_in_base"] == [] and len(m["files"]) > 2
    merged = _tensors(out)
    assert sorted(merged) == sorted(base)
    for key in base:
        expected = tuned[key] if key in backbone else base[key]  # heads copied from the base
        assert torch.allclose(merged[key], expected, atol=1e-6), key

    shutil.copy(xlmr_dirs / "base" / "config.json", out)
    model = transformers.AutoModelForMaskedLM.from_pretrained(out)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb
    assert torch.equal(emb, merged["roberta.embeddings.word_embeddings.weight"])

    # a bare encoder (no prefix) aligns with the MLM base: merging it gives the same weights
    out2 = tmp_path / "merged_bare"
    merge_models(xlmr_dirs / "base", [xlmr_dirs / "bare"], [1.0], "tv", 1.0, out2)
    for key, t in _tensors(out2).items():
        assert torch.allclose(t, merged[key], atol=1e-6), key


def test_llama_tied_round_trip_and_ties(llama_dirs, tmp_path):
    base_dir = llama_dirs / "base"
    base, tuned = _tensors(base_dir), _tensors(llama_dirs / "tuned")
    assert "lm_head.weight" not in base  # tied
    tv1, tv2 = tmp_path / "tv1.safetensors", tmp_path / "tv2.safetensors"
    extract_task_vector(base_dir, llama_dirs / "tuned", tv1)
    extract_task_vector(base_dir, llama_dirs / "tuned2", tv2)

    out = tmp_path / "tv"
    merge_into_base(base_dir, [tv1], [1.0], "tv", 1.0, out)
    merged = _tensors(out)
    assert set(merged) == set(base)  # no lm_head created
    for key in base:
        assert torch.allclose(merged[key], tuned[key], atol=1e-6), key
    shutil.copy(base_dir / "config.json", out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama_dirs / "tuned")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, merged["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 5, 7, 42, 99]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)

    # TIES over two task vectors == the math applied to each tensor; on-the-fly deltas agree
    kw = dict(density=0.3, sign="sum", normalize=True)
    out_t, out_m = tmp_path / "ties", tmp_path / "ties_models"
    stats = merge_into_base(base_dir, [tv1, tv2], [1.0, 0.5], "ties", 0.7, out_t, **kw)
    merge_models(base_dir, [llama_dirs / "tuned", llama_dirs / "tuned2"], [1.0, 0.5], "ties",
                 0.7, out_m, **kw)  # fmt: skip
    assert stats["n_merged"] == len(base)
    tau1, tau2 = _tensors(tv1), _tensors(tv2)
    from_files, from_models = _tensors(out_t), _tensors(out_m)
    for key in base:
        name = key.removeprefix("model.")
        expected = base[key] + 0.7 * torch.from_numpy(
            ties([tau1[name], tau2[name]], [1.0, 0.5], **kw)
        )
        assert torch.allclose(from_files[key], expected, atol=1e-6), key
        assert torch.allclose(from_models[key], expected, atol=1e-6), key


def test_engine_errors(llama_dirs, tmp_path):
    base_dir = llama_dirs / "base"
    tv = tmp_path / "tv.safetensors"
    extract_task_vector(base_dir, llama_dirs / "tuned", tv)
    with pytest.raises(CmmergeError, match="unknown merge method 'nope'"):
        merge_into_base(base_dir, [tv], [1.0], "nope", 1.0, tmp_path / "o")
    for bad in (0, 1.5):
        with pytest.raises(CmmergeError, match=f"got {bad}"):
            merge_into_base(base_dir, [tv], [1.0], "ties", 1.0, tmp_path / "o", density=bad)
    with pytest.raises(CmmergeError, match="not found: .*missing"):
        merge_into_base(tmp_path / "missing", [tv], [1.0], "tv", 1.0, tmp_path / "o")
    with pytest.raises(CmmergeError, match="not found: .*missing"):
        extract_task_vector(tmp_path / "missing", llama_dirs / "tuned", tmp_path / "x")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

    # shape mismatch on a shared backbone key
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(base_dir / "config.json", bad)
    tensors = _tensors(llama_dirs / "tuned")
    tensors["model.norm.weight"] = torch.ones(33)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CmmergeError, match=r"'norm.weight': \(32,\) in .* vs \(33,\)"):
        extract_task_vector(base_dir, bad, tmp_path / "x.safetensors")
    with pytest.raises(CmmergeError, match="shape mismatch for 'norm.weight'"):
        merge_models(base_dir, [bad], [1.0], "tv", 1.0, tmp_path / "o")
    # rows that differ in width are a mismatch (a grown vocabulary only adds rows)
    wide = dict(_tensors(tv))
    wide["embed_tokens.weight"] = torch.zeros(100, 33)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(
        CmmergeError, match=r"'embed_tokens.weight': \(100, 32\) in .* vs \(100, 33\)"
    ):
        merge_into_base(base_dir, [tmp_path / "wide.safetensors"], [1.0], "tv", 1.0, tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
