"""Parity with mergekit 0.1.5 (the ``parity`` extra): run mergekit itself and cmmerge on tiny
random XLM-R- and Llama-shaped float32 checkpoints; every backbone tensor must agree to 1e-6.

Heads (``lm_head.*``) are left out on purpose: cmmerge copies them from the base (DESIGN
section 5), mergekit merges them.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"  # mergekit must never try the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

try:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "mergekit is not importable: pip install -e .[parity] to run the parity tests",
        allow_module_level=True,
    )

import transformers  # noqa: E402

from cmmerge.io.checkpoint import CheckpointReader  # noqa: E402
from cmmerge.merging.engine import merge_models  # noqa: E402
from cmmerge.merging.keys import is_head_key  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _models(kind: str):
    if kind == "xlmr":
        cfg = transformers.XLMRobertaConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=40,
        )
        return transformers.XLMRobertaForMaskedLM(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module", params=["xlmr", "llama"])
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = _models(request.param)
    model.save_pretrained(root / "base")
    for i, name in enumerate(("m1", "m2"), start=1):
        g = torch.Generator().manual_seed(i)
        tuned = _models(request.param)
        tuned.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        tuned.save_pretrained(root / name)
    return root


def _mergekit(root, method, weights, density, scale, normalize, out):
    models = []
    for name, w in zip(("m1", "m2"), weights, strict=False):
        params = {"weight": w} | ({"density": density} if method == "ties" else {})
        models.append({"model": str(root / name), "parameters": params})
    config = {
        "merge_method": method,
        "base_model": str(root / "base"),
        "models": models,
        "parameters": {"lambda": scale, "normalize": normalize},
        "dtype": "float32",
    }
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))),
        str(out),
        MergeOptions(copy_tokenizer=False, quiet=True),
    )


def _check(root, tmp_path, method, weights, density, scale, normalize):
    tag = f"{method}-{len(weights)}-{density}-{normalize}"
    ref, got = tmp_path / f"mk-{tag}", tmp_path / f"cm-{tag}"
    _mergekit(root, method, weights, density, scale, normalize, ref)
    sources = [root / n for n in ("m1", "m2")[: len(weights)]]
    merge_models(
        root / "base", sources, weights, method, scale, got, density=density, normalize=normalize
    )
    n = 0
    with CheckpointReader(ref) as r, CheckpointReader(got) as c:
        for key in c.keys():
            if is_head_key(key) or key not in r:
                continue
            diff = (r.get(key) - c.get(key)).abs().max().item()
            assert diff <= 1e-6, (tag, key, diff)
            n += 1
    assert n >= 15, tag  # the backbone was compared


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.7], [1.0, 0.6]], ids=["one", "two"])
def test_task_arithmetic_matches_mergekit(family, tmp_path, weights, normalize):
    _check(family, tmp_path, "task_arithmetic", weights, None, 0.8, normalize)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.55, 0.8, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.7], [1.0, 0.6]], ids=["one", "two"])
def test_ties_matches_mergekit(family, tmp_path, weights, normalize, density):
    _check(family, tmp_path, "ties", weights, density, 0.5, normalize)
