"""Key alignment: map checkpoint tensor names to backbone names (``base_model_prefix`` stripped).

A checkpoint may be a bare encoder (``embeddings.*``), a model with a head (``roberta.*`` +
``lm_head.*``, ``model.*`` + ``lm_head.*``) or a classifier. Task vectors are keyed by backbone
names so that all of these line up; head tensors have no backbone name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cmmerge.errors import CmmergeError

# Top-level modules that hold task heads in transformers' *For* classes.
HEAD_PREFIXES: tuple[str, ...] = (
    "lm_head",
    "cls",
    "classifier",
    "pre_classifier",
    "score",
    "qa_outputs",
    "vocab_transform",
    "vocab_layer_norm",
    "vocab_projector",
    "generator_lm_head",
    "generator_predictions",
    "discriminator_predictions",
)

# Output embeddings a checkpoint may store in place of the input embeddings tied to them (then
# the file has no backbone embedding key): the alias stands for the backbone tensor.
TIED_HEAD_ALIASES: dict[str, str] = {
    "lm_head.decoder.weight": "embeddings.word_embeddings.weight",  # RoBERTa, XLM-R
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",  # BERT
    "vocab_projector.weight": "embeddings.word_embeddings.weight",  # DistilBERT
    "generator_lm_head.weight": "embeddings.word_embeddings.weight",  # ELECTRA
    "lm_head.weight": "embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma
}

# ``base_model_prefix`` of common architectures (checked against transformers in the tests).
KNOWN_PREFIXES: dict[str, str] = {
    "xlm-roberta": "roberta", "roberta": "roberta", "bert": "bert", "distilbert": "distilbert",
    "llama": "model", "mistral": "model", "qwen2": "model", "qwen3": "model", "gemma": "model",
    "gemma2": "model", "phi3": "model",
}  # fmt: skip


def backbone_prefix(model_dir: str | os.PathLike) -> str:
    """The ``base_model_prefix`` of the model in ``model_dir`` (from its config.json).

    Examples: ``roberta`` for xlm-roberta, ``bert`` for bert, ``model`` for llama.

    Raises:
        CmmergeError: No readable config.json, or a ``model_type`` transformers does not know.
    """
    config_file = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except FileNotFoundError:
        raise CmmergeError(f"no config.json in {model_dir}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CmmergeError(f"cannot read model_type from {config_file}: {exc!r}") from None

    if model_type in KNOWN_PREFIXES:  # importing a modeling module costs seconds
        return KNOWN_PREFIXES[model_type]
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    class_name = MODEL_MAPPING_NAMES.get(model_type)
    if isinstance(class_name, (tuple, list)):
        class_name = class_name[0]
    model_class = getattr(transformers, class_name, None) if class_name else None
    if model_class is None:
        raise CmmergeError(f"unknown model_type {model_type!r} in {config_file}")
    return str(model_class.base_model_prefix)


def is_head_key(key: str) -> bool:
    """True for a tensor of a task head (``lm_head.weight``, ``classifier.out_proj.bias``...)."""
    return key.split(".", 1)[0] in HEAD_PREFIXES


def backbone_key(key: str, prefix: str) -> str | None:
    """Backbone name of ``key``, or None for a head tensor.

    ``roberta.encoder.layer.0...`` -> ``encoder.layer.0...`` (prefix ``roberta``); a key of a bare
    backbone (``embeddings.*``, ``layers.*``, ``norm.weight``) is returned unchanged; head keys
    (``lm_head.*``, ``cls.*``, ``classifier.*``, ``score.*``, ``qa_outputs.*``) give None.
    """
    if prefix and key.startswith(prefix + "."):
        return key[len(prefix) + 1 :]
    if is_head_key(key):
        return None
    return key


def backbone_map(keys: list[str], prefix: str, where: str = "checkpoint") -> dict[str, str]:
    """Map backbone name -> original key for the non-head ``keys`` (order kept), and for a
    tied output embedding stored without its input embedding (``TIED_HEAD_ALIASES``).

    Raises:
        CmmergeError: Two keys map to one backbone name (e.g. both ``roberta.x`` and ``x``).
    """
    out: dict[str, str] = {}
    for key in keys:
        name = backbone_key(key, prefix)
        if name is None:
            continue
        if name in out:
            raise CmmergeError(f"{where}: keys {out[name]!r} and {key!r} both map to {name!r}")
        out[name] = key
    present = set(keys)
    for alias, name in TIED_HEAD_ALIASES.items():
        if alias in present and name not in out:
            out[name] = alias
    return out
