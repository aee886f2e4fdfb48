"""A zoo of tiny random checkpoints laid out exactly like the hub checkpoints users load.

Each member is a model folder with the key names, config.json fields, dtypes and files of a
real checkpoint (hidden size 32, 2 layers, the tiny models' tokenizer and vocabulary), written
the way the hub's files were written (``save_file`` of a state dict, an older config), not by
today's ``save_pretrained``. Layouts, from transformers' classes and the hub's loading logs:

- ``xlm-roberta-base``: ``XLMRobertaForMaskedLM`` keys with the tied ``lm_head.decoder.weight``
  stored, no ``lm_head.decoder.bias``, plus ``roberta.pooler.dense.*`` (loading it prints
  "weights not used: roberta.pooler..."); float32; a config without ``tie_word_embeddings``.
- ``bert-base-multilingual-cased``: ``BertForPreTraining``: ``bert.*`` with the pooler,
  ``cls.predictions.*`` (decoder weight stored, no decoder bias) and ``cls.seq_relationship.*``;
  LayerNorm parameters under the TF-era names ``gamma``/``beta`` that transformers renames on
  load (the hub's bert-base-uncased file has them; mBERT came from the same conversion).
- ``multilingual-e5-small``: a bare ``BertModel`` (no ``bert.`` prefix) with its pooler;
  ``multilingual-e5-small-nopooler``: the same without (as ``shared/tools/me5_small`` builds it).
- ``Llama-3.2-1B``: tied, bfloat16, no ``lm_head.weight`` in the file, a 4.45-era config
  (``torch_dtype``, llama3 ``rope_scaling``), generation_config.json.
- ``Llama-3.1-8B``: untied (``lm_head.weight`` stored), bfloat16, sharded: 3 shards and
  ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``).
- ``gemma-3-270m``: ``Gemma3ForCausalLM`` (``gemma3_text``) as google/gemma-3-270m ships it: tied
  (no ``lm_head.weight``), bfloat16, a 4.55-era config (``torch_dtype``, ``rope_theta`` and
  ``rope_local_base_freq``, ``layer_types`` mixing sliding-window and global attention,
  ``sliding_window``, ``query_pre_attn_scalar``), embeddings scaled by sqrt(hidden) in the
  forward pass (a non-persistent buffer: not in the file), ``q_norm``/``k_norm`` and four norms
  per layer; its tokenizer pads on the left, as Gemma's does.
- ``legacy-bin``: an XLM-R saved by transformers 4.x as ``pytorch_model.bin`` only (with the
  int64 ``roberta.embeddings.position_ids`` buffer and ``lm_head.decoder.bias``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 4, 64
DECODERS = ("Llama-3.2-1B", "Llama-3.1-8B")
GEMMA_LAYER_TYPES = ["sliding_attention", "full_attention"]
GEMMA_WINDOW = 4  # shorter than the texts, so the sliding layers really slide


def tokenizer_dir(family: str) -> Path:
    """The folder of the project's tiny model of ``family`` (``xlmr`` or ``llama``), built once
    into the test session's cache: its tokenizer serves every zoo member of that family."""
    from conftest import compose

    from cmmerge.config.inputs import resolve_model

    return resolve_model(compose("cpt", [f"model=tiny-{family}"]))


def _copy_tokenizer(family: str, out: Path) -> int:
    """Copy the tiny tokenizer of ``family`` into ``out``; returns its vocabulary size."""
    src = tokenizer_dir(family)
    for path in src.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(path, out / path.name)
    return int(json.loads((src / "config.json").read_text())["vocab_size"])


def _plain(state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict:
    """Contiguous, unshared copies (safetensors refuses shared storage), cast to ``dtype``."""
    return {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).clone()
        for k, v in state.items()
    }


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with LayerNorm parameters under their TF-era names (``gamma``, ``beta``)."""
    old = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    out = {}
    for key, value in state.items():
        suffix = next((s for s in old if key.endswith(s)), None)
        out[key[: -len(suffix)] + old[suffix] if suffix else key] = value
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _encoder_config(vocab: int, **fields: object) -> dict:
    return {
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": vocab,
        **fields,
    }


def xlm_roberta_base(out: Path) -> Path:
    vocab = _copy_tokenizer("xlmr", out)
    config = _encoder_config(
        vocab,
        architectures=["XLMRobertaForMaskedLM"],
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-05,
        max_position_embeddings=130,
        model_type="xlm-roberta",
        output_past=True,
        pad_token_id=1,
        type_vocab_size=1,
    )
    _write_json(out / "config.json", dict(sorted(config.items())))
    cfg = transformers.XLMRobertaConfig(**config)
    torch.manual_seed(0)
    state = transformers.XLMRobertaForMaskedLM(cfg).state_dict()
    pooler = transformers.XLMRobertaModel(cfg).pooler.state_dict()
    state.pop("lm_head.decoder.bias")
    state.update({f"roberta.pooler.{k}": v for k, v in pooler.items()})
    save_file(_plain(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def bert_base_multilingual_cased(out: Path) -> Path:
    vocab = _copy_tokenizer("xlmr", out)
    config = _encoder_config(
        vocab,
        architectures=["BertForMaskedLM"],
        directionality="bidi",
        layer_norm_eps=1e-12,
        max_position_embeddings=128,
        model_type="bert",
        pad_token_id=0,
        pooler_fc_size=HIDDEN,
        pooler_num_attention_heads=HEADS,
        pooler_num_fc_layers=3,
        pooler_size_per_head=8,
        pooler_type="first_token_transform",
        type_vocab_size=2,
    )
    _write_json(out / "config.json", config)
    torch.manual_seed(0)
    state = transformers.BertForPreTraining(transformers.BertConfig(**config)).state_dict()
    state.pop("cls.predictions.decoder.bias")
    save_file(_plain(legacy_names(state)), str(out / "model.safetensors"), {"format": "pt"})
    return out


def multilingual_e5_small(out: Path, pooler: bool = True) -> Path:
    vocab = _copy_tokenizer("xlmr", out)
    config = _encoder_config(
        vocab,
        architectures=["BertModel"],
        classifier_dropout=None,
        layer_norm_eps=1e-12,
        max_position_embeddings=128,
        model_type="bert",
        pad_token_id=0,
        position_embedding_type="absolute",
        torch_dtype="float32",
        transformers_version="4.29.0.dev0",
        type_vocab_size=2,
        use_cache=True,
    )
    _write_json(out / "config.json", dict(sorted(config.items())))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**config)
    state = transformers.BertModel(cfg, add_pooling_layer=pooler).state_dict()
    save_file(_plain(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _llama_config(vocab: int, tied: bool, **fields: object) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
        **fields,
    }


def _llama_state(config: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).state_dict()


def _generation_config(out: Path, version: str, sampling: bool) -> None:
    gen = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1}
    if sampling:
        gen |= {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    _write_json(out / "generation_config.json", {**gen, "transformers_version": version})


def llama_3_2_1b(out: Path) -> Path:
    vocab = _copy_tokenizer("llama", out)
    rope = {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 64,
        "rope_type": "llama3",
    }
    config = _llama_config(
        vocab, True, head_dim=HIDDEN // HEADS, rope_scaling=rope,
        transformers_version="4.45.0.dev0",
    )  # fmt: skip
    _write_json(out / "config.json", dict(sorted(config.items())))
    _generation_config(out, "4.45.0.dev0", sampling=True)
    state = _llama_state(config)
    state.pop("lm_head.weight")  # tied: the hub file has no lm_head.weight
    save_file(_plain(state, torch.bfloat16), str(out / "model.safetensors"), {"format": "pt"})
    return out


def llama_3_1_8b(out: Path, shards: int = 3) -> Path:
    vocab = _copy_tokenizer("llama", out)
    rope = {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 64,
        "rope_type": "llama3",
    }
    config = _llama_config(vocab, False, rope_scaling=rope, transformers_version="4.43.0.dev0")
    _write_json(out / "config.json", dict(sorted(config.items())))
    _generation_config(out, "4.43.0.dev0", sampling=True)
    state = _plain(_llama_state(config), torch.bfloat16)
    keys = list(state)  # embeddings first, layers in order, then norm and lm_head
    per = -(-len(keys) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)
    return out


def gemma_3_270m(out: Path) -> Path:
    vocab = _copy_tokenizer("llama", out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    _write_json(out / "tokenizer_config.json", {**tok_config, "padding_side": "left"})
    ids = json.loads((tokenizer_dir("llama") / "config.json").read_text())
    head_dim = HIDDEN // HEADS
    config = {
        "_sliding_window_pattern": 2,
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "final_logit_softcapping": None,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "layer_types": GEMMA_LAYER_TYPES,
        "max_position_embeddings": 512,
        "model_type": "gemma3_text",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": 1,
        "pad_token_id": ids["pad_token_id"],
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": GEMMA_WINDOW,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.55.0.dev0",
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": vocab,
    }
    _write_json(out / "config.json", config)
    gen = {"cache_implementation": "hybrid", "do_sample": True, "top_k": 64, "top_p": 0.95}
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"], 106],
         "pad_token_id": config["pad_token_id"], **gen, "transformers_version": "4.55.0.dev0"},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(out)
    )
    state = model.state_dict()
    state.pop("lm_head.weight")  # tied: the hub file has no lm_head.weight
    save_file(_plain(state, torch.bfloat16), str(out / "model.safetensors"), {"format": "pt"})
    return out


def legacy_bin(out: Path) -> Path:
    vocab = _copy_tokenizer("xlmr", out)
    config = _encoder_config(
        vocab,
        architectures=["XLMRobertaForMaskedLM"],
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-05,
        max_position_embeddings=130,
        model_type="xlm-roberta",
        pad_token_id=1,
        position_embedding_type="absolute",
        torch_dtype="float32",
        transformers_version="4.30.2",
        type_vocab_size=1,
        use_cache=True,
    )
    _write_json(out / "config.json", dict(sorted(config.items())))
    torch.manual_seed(0)
    state = transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**config))
    state = _plain(state.state_dict())
    state["roberta.embeddings.position_ids"] = torch.arange(130).unsqueeze(0)
    torch.save(state, out / "pytorch_model.bin")
    return out


MEMBERS: dict[str, Callable[[Path], Path]] = {
    "xlm-roberta-base": xlm_roberta_base,
    "bert-base-multilingual-cased": bert_base_multilingual_cased,
    "multilingual-e5-small": multilingual_e5_small,
    "multilingual-e5-small-nopooler": lambda out: multilingual_e5_small(out, pooler=False),
    "Llama-3.2-1B": llama_3_2_1b,
    "Llama-3.1-8B": llama_3_1_8b,
    "legacy-bin": legacy_bin,
}
# Layouts with their own tests (tests/test_gemma_zoo.py), outside test_zoo.py's parametrisation.
REPLICAS: dict[str, Callable[[Path], Path]] = {"gemma-3-270m": gemma_3_270m}


def make(name: str, root: Path) -> Path:
    """Write zoo member ``name`` into ``root/name`` (once) and return the folder."""
    out = Path(root) / name
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        (MEMBERS | REPLICAS)[name](out)
    return out


def perturbed(src: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A copy of zoo folder ``src`` (same files, keys, dtypes and shards) whose floating tensors
    are moved by ``scale`` * N(0, 1) noise: a stand-in for a model tuned from it."""
    from cmmerge.io.checkpoint import CheckpointReader

    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    for file in sorted(out.glob("*.safetensors")):
        with CheckpointReader(file) as reader:
            state = {k: reader.get(k) for k in reader.keys()}
        for key, t in state.items():
            if t.is_floating_point():
                noise = scale * torch.randn(t.shape, generator=g)
                state[key] = (t.float() + noise).to(t.dtype)
        save_file(state, str(file), metadata={"format": "pt"})
    return out


def small_data(root: Path, n_corpus: int = 240, n_task: int = 40) -> list[str]:
    """Overrides for a small custom CPT corpus and a two-label custom task (texts from the
    shipped unlabelled sample), so a whole chain runs in seconds."""
    from cmmerge.presets import SAMPLES_DIR

    lines = (SAMPLES_DIR / "hinglish_unlabeled/l3cube_hinglid/test.txt").read_text().split("\n")
    texts, words = [], []
    for line in lines:
        if line.strip():
            words.append(line.split("\t")[0])
        elif words:
            texts.append(" ".join(words))
            words = []
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n".join(texts[:n_corpus]) + "\n")
    rest = texts[n_corpus:]
    for i, split in enumerate(("train", "validation", "test")):
        rows = rest[i * n_task : (i + 1) * n_task]
        body = "".join(f'"{t.replace(chr(34), "")}",{("negative", "positive")[j % 2]}\n'
                       for j, t in enumerate(rows))  # fmt: skip
        (root / f"{split}.csv").write_text("text,label\n" + body)
    return [
        "corpus=custom",
        f"corpus.paths=[{root / 'corpus.txt'}]",
        "task=custom",
        f"task.train={root / 'train.csv'}",
        f"task.validation={root / 'validation.csv'}",
        f"task.test={root / 'test.csv'}",
        "task.labels=[negative,positive]",
        "data.leakage_tasks=[]",
    ]
