"""Tiny random-initialised encoder/decoder models with a tokenizer trained on the shipped corpus.

Built offline and deterministically for a seed, then cached by content key, so the demo and the
tests need no model hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from cmmerge import __version__

# Special tokens per family: (bos, eos, pad, unk, mask).
_SPECIALS = {
    "xlmr": {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "cls_token": "<s>",
        "sep_token": "</s>",
    },
    "llama": {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
    },
}
_ORDER = {
    "xlmr": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|unk|>"],
}


def train_tokenizer(texts: Sequence[str], family: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-fallback-free BPE tokenizer (SentencePiece-style spaces) on ``texts``."""
    specials = _SPECIALS[family]
    order = _ORDER[family]
    tok = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=order, min_frequency=2, show_progress=False
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos, eos = specials["bos_token"], specials["eos_token"]
    if family == "xlmr":
        single, pair = f"{bos} $A {eos}", f"{bos} $A {eos} {eos} $B {eos}"
        special_ids = [(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))]
    else:
        single, pair = f"{bos} $A", f"{bos} $A $B"
        special_ids = [(bos, tok.token_to_id(bos))]
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special_ids
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    fast.model_max_length = 512
    return fast


def _model_for(family: str, arch: Mapping, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in _SPECIALS[family].items()}
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        intermediate_size=arch["intermediate_size"],
        pad_token_id=ids["pad_token"],
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
    )
    if family == "xlmr":
        config = XLMRobertaConfig(
            max_position_embeddings=arch["max_positions"] + 2, type_vocab_size=1, **common
        )
        return XLMRobertaForMaskedLM(config)
    config = LlamaConfig(
        max_position_embeddings=arch["max_positions"],
        num_key_value_heads=arch.get("num_kv_heads", arch["num_heads"]),
        tie_word_embeddings=True,
        **common,
    )
    return LlamaForCausalLM(config)


def tiny_cache_key(family: str, arch: Mapping, texts: Sequence[str], seed: int) -> str:
    """Content key of a tiny model: architecture, seed, tokenizer corpus and library versions."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "family": family,
                "arch": dict(arch),
                "seed": seed,
                "cmmerge": __version__,
                "transformers": transformers.__version__,
            },
            sort_keys=True,
        ).encode()
    )
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def build_tiny_model(
    family: str, arch: Mapping, texts: Sequence[str], out_dir: Path, seed: int = 0
) -> Path:
    """Build (or reuse from ``out_dir``'s parent cache) a tiny model folder; returns its path.

    Args:
        family: ``xlmr`` (masked-LM encoder) or ``llama`` (causal-LM decoder, tied embeddings).
        arch: hidden_size, num_layers, num_heads, intermediate_size, max_positions, vocab_size.
        texts: corpus the tokenizer is trained on.
        out_dir: final folder; written atomically (temporary folder, then rename).
        seed: weight initialisation seed.
    """
    if family not in _SPECIALS:
        raise ValueError(f"unknown tiny model family {family!r}")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tokenizer = train_tokenizer(texts, family, int(arch["vocab_size"]))
        torch.manual_seed(seed)
        model = _model_for(family, arch, tokenizer)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            f"# tiny-{family}\n\nRandomly initialised (seed {seed}) {type(model).__name__} "
            f"built by "
            f"cmmerge {__version__} for offline demos and tests; tokenizer: BPE trained on the "
            f"shipped code-mixed corpus samples. Architecture: {json.dumps(dict(arch))}.\n"
        )
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process built it first
            if not (out_dir / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
