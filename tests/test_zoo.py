"""Every checkpoint layout of the zoo (tests/zoo.py) through the whole chain, as users run it:
cpt -> extract -> merge (tv, ties) -> finetune -> evaluate with ``model.name_or_path=<zoo dir>``,
plus a standalone whole-model merge of the CPT model into the zoo base."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
import zoo
from conftest import FAST, compose

from cmmerge.commands import cpt, evaluate, extract, finetune, merge
from cmmerge.config.ids import stage_dirs
from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader
from cmmerge.io.manifest import read_manifest
from cmmerge.merging.keys import backbone_map, backbone_prefix, is_head_key

transformers = pytest.importorskip("transformers")

# Floating tensors of each layout that the CPT model does not save: carried over from the base.
BASE_ONLY = {
    "xlm-roberta-base": {"roberta.pooler.dense.weight", "roberta.pooler.dense.bias"},
    "bert-base-multilingual-cased": {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias",
        "cls.seq_relationship.weight", "cls.seq_relationship.bias",
    },
    "multilingual-e5-small": {"pooler.dense.weight", "pooler.dense.bias"},
    "multilingual-e5-small-nopooler": set(),
    "Llama-3.2-1B": set(),
    "Llama-3.1-8B": set(),
    "legacy-bin": set(),
}  # fmt: skip
# Stored copies of tied tensors, left out of merged models (transformers re-ties them).
TIED_COPIES = {
    "xlm-roberta-base": {"lm_head.decoder.weight"},
    "bert-base-multilingual-cased": {"cls.predictions.decoder.weight"},
    "legacy-bin": {"lm_head.decoder.weight", "lm_head.decoder.bias"},
}
STEPS = ["cpt.max_steps=2", "finetune.max_steps=2"]  # the chain must run, not learn
TIES = ["method=ties", "lambda=0.5", "density=0.2"]
TV = ["method=tv", "lambda=1.0"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train faster on one thread (and far faster on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return zoo.small_data(tmp_path_factory.mktemp("zoo-data"))


def _tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path, allow_pickle=True) as r:
        return {k: r.get(k) for k in r.keys()}


def _by_name(path) -> dict[str, torch.Tensor]:
    """Tensors of a model folder by aligned name (backbone name, or a head's own key)."""
    with CheckpointReader(path, allow_pickle=True) as r:
        names = backbone_map(r.keys(), backbone_prefix(path), str(path), heads=True)
        return {name: r.get(key) for name, key in names.items()}


def _auto_class(name: str):
    if name in zoo.DECODERS:
        return transformers.AutoModelForCausalLM
    if name.startswith("multilingual-e5"):
        return transformers.AutoModel
    return transformers.AutoModelForMaskedLM


def _class_keys(cls, config_dir, **kw) -> tuple[set[str], dict]:
    """State-dict keys and tied weights of transformers' ``cls`` built from a zoo config."""
    config = transformers.AutoConfig.from_pretrained(config_dir, **kw)
    with torch.device("meta"):
        model = cls(config)
    return set(model.state_dict()), dict(model.get_expanded_tied_weights_keys())


def test_zoo_layouts_are_the_hub_layouts_of_transformers_classes(zoo_root):
    """Each member's keys are its transformers class's state dict, less what the hub's file
    leaves out (tied copies) and plus what it carries beyond the class (a pooler, an NSP head)."""
    d = {name: zoo.make(name, zoo_root) for name in zoo.MEMBERS}
    keys = {name: set(_tensors(folder)) for name, folder in d.items()}

    mlm, tied = _class_keys(transformers.XLMRobertaForMaskedLM, d["xlm-roberta-base"])
    assert tied == {
        "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
        "lm_head.decoder.bias": "lm_head.bias",
    }
    pooler = BASE_ONLY["xlm-roberta-base"]
    assert keys["xlm-roberta-base"] == mlm - {"lm_head.decoder.bias"} | pooler
    bert, tied = _class_keys(transformers.BertForPreTraining, d["bert-base-multilingual-cased"])
    assert tied["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    want = set(zoo.legacy_names(dict.fromkeys(bert - {"cls.predictions.decoder.bias"})))
    assert keys["bert-base-multilingual-cased"] == want
    assert BASE_ONLY["bert-base-multilingual-cased"] <= bert
    bare, _ = _class_keys(transformers.BertModel, d["multilingual-e5-small"])
    assert keys["multilingual-e5-small"] == bare and "pooler.dense.weight" in bare
    assert keys["multilingual-e5-small-nopooler"] == bare - BASE_ONLY["multilingual-e5-small"]
    clm, tied = _class_keys(transformers.LlamaForCausalLM, d["Llama-3.2-1B"])
    assert tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert keys["Llama-3.2-1B"] == clm - {"lm_head.weight"}
    clm, tied = _class_keys(transformers.LlamaForCausalLM, d["Llama-3.1-8B"])
    assert tied == {} and keys["Llama-3.1-8B"] == clm
    index = json.loads((d["Llama-3.1-8B"] / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == clm and len(set(index["weight_map"].values())) == 3
    for name in zoo.DECODERS:  # bfloat16, with a generation config
        with CheckpointReader(d[name]) as r:
            assert {str(r.dtype(k)) for k in r.keys()} == {"bfloat16"}
        assert (d[name] / "generation_config.json").is_file()
    config = json.loads((d["Llama-3.2-1B"] / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config  # a 4.45-era config
    legacy = {
        p.name for p in d["legacy-bin"].iterdir() if p.name.endswith((".bin", ".safetensors"))
    }
    assert (
        legacy == {"pytorch_model.bin"} and "roberta.embeddings.position_ids" in keys["legacy-bin"]
    )
    # transformers loads each as the hub's does, unused keys being the ones carried over
    for name in ("xlm-roberta-base", "bert-base-multilingual-cased"):
        _, info = transformers.AutoModelForMaskedLM.from_pretrained(
            d[name], output_loading_info=True
        )
        assert set(info["unexpected_keys"]) == BASE_ONLY[name] and not info["missing_keys"]


@pytest.mark.parametrize("name", list(zoo.MEMBERS))
def test_zoo_member_runs_the_whole_chain(name, zoo_root, data, tmp_path):
    base_dir = zoo.make(name, zoo_root)
    pickle = ["allow_pickle=true"] if name == "legacy-bin" else []
    common = [
        f"model.name_or_path={base_dir}",
        f"run.root={tmp_path}",
        "run.name=zoo",
        *FAST,
        *STEPS,
        *data,
        *pickle,
    ]
    cpt.run(compose("cpt", common))
    dirs = stage_dirs(compose("extract", common))
    cpt_dir = dirs["cpt"] / "model"
    extract.run(compose("extract", common))

    for overrides in (TV, TIES):
        merge.run(compose("merge", common + overrides))
    base, tuned = _tensors(base_dir), _by_name(cpt_dir)
    heads = {k for k in base if is_head_key(k) and base[k].is_floating_point()}
    heads -= TIED_COPIES.get(name, set())
    tau = _tensors(dirs["extract"] / "task_vector.safetensors")
    stats = json.loads((dirs["extract"] / "stats.json").read_text())
    assert set(stats["base_only"]) == BASE_ONLY[name]
    tv_dir = stage_dirs(compose("merge", common + TV))["merge"] / "model"
    ties_dir = stage_dirs(compose("merge", common + TIES))["merge"] / "model"
    for folder in (tv_dir, ties_dir):
        record = yaml.safe_load((folder / "merge.yaml").read_text())
        # the task vector holds the backbone: the base's heads are copied, the rest it lacks too
        assert set(record["heads_copied"]) == heads and record["dtype"] == "float32"
        assert set(record["base_only"]) == BASE_ONLY[name] - heads
        assert set(record["dropped_tied"]) == TIED_COPIES.get(name, set())
        config = json.loads((folder / "config.json").read_text())
        assert config["dtype"] == "float32" and config.get("torch_dtype", "float32") == "float32"
        card = (folder / "README.md").read_text()
        assert all(f"`{k}`" in card for k in BASE_ONLY[name]) and "| dtype | float32 |" in card
        merged = _tensors(folder)
        assert set(merged) == set(base) - TIED_COPIES.get(name, set())
        for key in BASE_ONLY[name]:  # carried over unchanged
            assert torch.equal(merged[key], base[key].float()), key
        model = _auto_class(name).from_pretrained(folder)
        assert model.dtype == torch.float32
    # TV at lambda 1 gives the CPT model's backbone, to float32 precision (bf16 bases too)
    tv = _by_name(tv_dir)
    for key in tau:
        torch.testing.assert_close(tv[key], tuned[key].float(), rtol=0, atol=1e-6)

    ft_cfg = compose("finetune", common + TIES + ["init=merged"])
    finetune.run(ft_cfg)
    evaluate.run(compose("evaluate", common + TIES + ["init=merged"]))
    ev = stage_dirs(ft_cfg)["evaluate"] / "custom"
    metrics = json.loads((ev / "metrics.json").read_text())
    assert read_manifest(ev) is not None and metrics["n"] == 40 and 0 <= metrics["macro_f1"] <= 1

    # a standalone merge of the CPT model at lambda 1 gives it whole, heads included
    out = tmp_path / "standalone"
    merge.run(
        compose(
            "merge",
            [
                f"base={base_dir}",
                f"models=[{cpt_dir}]",
                "method=task_arithmetic",
                "lambda=1.0",
                f"output={out}",
                f"run.root={tmp_path}",
                *pickle,
            ],
        )
    )
    whole, base_named = _by_name(out), _by_name(base_dir)
    only_base = {n.removeprefix(backbone_prefix(base_dir) + ".") for n in BASE_ONLY[name]}
    for key, t in whole.items():
        if key in only_base or not t.is_floating_point():  # copied from the base
            assert torch.equal(t, base_named[key].to(t.dtype)), key
        else:
            torch.testing.assert_close(t, tuned[key].float(), rtol=0, atol=1e-6)


def test_pickle_checkpoints_are_refused_unless_allowed(zoo_root, tmp_path):
    """A folder whose only weights are ``pytorch_model.bin`` is refused in one line by every
    stage that reads it (the chain above runs it with allow_pickle=true)."""
    legacy = zoo.make("legacy-bin", zoo_root)
    xlmr = zoo.make("xlm-roberta-base", zoo_root)
    common = [f"run.root={tmp_path}", *FAST]
    for stage, overrides in (
        (cpt, [f"model.name_or_path={legacy}"]),
        (extract, [f"model.name_or_path={legacy}"]),
        (merge, [f"base={legacy}", f"models=[{xlmr}]", f"output={tmp_path / 'o'}"]),
        (merge, [f"base={xlmr}", f"models=[{legacy}]", f"output={tmp_path / 'o'}"]),
    ):
        name = stage.__name__.rsplit(".", 1)[1]
        with pytest.raises(CmmergeError, match="only pickle weights") as err:
            stage.run(compose(name, common + overrides))
        assert "\n" not in str(err.value) and "allow_pickle=true" in str(err.value)
        assert str(legacy) in str(err.value)
    assert not (tmp_path / "o").exists() and not (tmp_path / "default").exists()
