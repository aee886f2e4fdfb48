"""Key alignment: map checkpoint tensor names to the names tensors are matched by.

A checkpoint may be a bare encoder (``embeddings.*``), a model with a head (``roberta.*`` +
``lm_head.*``, ``model.*`` + ``lm_head.*``) or a classifier. Backbone tensors are matched by
their backbone name (``base_model_prefix`` stripped), so all of these line up; task vectors are
keyed by backbone names. Head tensors (``lm_head.*``, ``cls.*``...) are matched by their own key.
Legacy LayerNorm names (``LayerNorm.gamma``/``beta``, as in the hub's ``bert-base-uncased``
files, which transformers renames on load) are matched as ``LayerNorm.weight``/``bias``.
"""

from __future__ import annotations

import json
import os
import re
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

# Output-layer biases tied to a head's own bias when the embeddings are tied (transformers 5).
TIED_BIAS_ALIASES: dict[str, str] = {
    "lm_head.decoder.bias": "lm_head.bias",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

# ``base_model_prefix`` of common architectures (checked against transformers in the tests).
KNOWN_PREFIXES: dict[str, str] = {
    "xlm-roberta": "roberta", "roberta": "roberta", "bert": "bert", "distilbert": "distilbert",
    "llama": "model", "mistral": "model", "qwen2": "model", "qwen3": "model", "gemma": "model",
    "gemma2": "model", "gemma3_text": "model", "phi3": "model",
}  # fmt: skip

# ``tie_word_embeddings`` of a config.json that does not say (the config class's default;
# checked against transformers in the tests). Hub configs of encoders often leave it out.
TIED_BY_DEFAULT: dict[str, bool] = {
    "xlm-roberta": True, "roberta": True, "bert": True, "distilbert": True, "electra": True,
    "llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True,
    "gemma2": True, "gemma3_text": True, "phi3": False,
}  # fmt: skip

_LEGACY = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def canonical(key: str) -> str:
    """``key`` with a legacy LayerNorm parameter name replaced (``...LayerNorm.gamma`` ->
    ``...LayerNorm.weight``), as transformers does on load."""
    for old, new in _LEGACY.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def layer_template(name: str) -> str | None:
    """``name`` with its layer numbers replaced by ``#`` (``layers.3.mlp.w`` -> ``layers.#.mlp.w``),
    or None for a tensor outside numbered layers (embeddings, pooler, heads)."""
    template = _INDEX.sub("#", name)
    return template if template != name else None


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


def ties_embeddings(config: dict) -> bool:
    """Whether a config.json (as a dict) ties the output embeddings to the input ones."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    model_type = config.get("model_type")
    if model_type in TIED_BY_DEFAULT:
        return TIED_BY_DEFAULT[model_type]
    if not model_type:
        return False
    from transformers import AutoConfig  # costs seconds: only for unlisted architectures

    try:
        return bool(AutoConfig.for_model(model_type).tie_word_embeddings)
    except (ValueError, KeyError):
        return False


def tied_copy(key: str, name: str, keys: set[str] | dict) -> bool:
    """True for a stored copy of a tied tensor (with tied embeddings): an output embedding
    stored next to the input embedding it is tied to (``name`` is then not the backbone name it
    stands for), or an output bias next to the head bias it is tied to."""
    if key in TIED_HEAD_ALIASES:
        return name != TIED_HEAD_ALIASES[key]
    return key in TIED_BIAS_ALIASES and TIED_BIAS_ALIASES[key] in keys


def is_head_key(key: str) -> bool:
    """True for a tensor of a task head (``lm_head.weight``, ``classifier.out_proj.bias``...)."""
    return key.split(".", 1)[0] in HEAD_PREFIXES


def backbone_key(key: str, prefix: str) -> str | None:
    """Backbone name of ``key``, or None for a head tensor.

    ``roberta.encoder.layer.0...`` -> ``encoder.layer.0...`` (prefix ``roberta``); a key of a bare
    backbone (``embeddings.*``, ``layers.*``, ``norm.weight``) is returned unchanged; head keys
    (``lm_head.*``, ``cls.*``, ``classifier.*``, ``score.*``, ``qa_outputs.*``) give None.
    Legacy LayerNorm names come out as ``LayerNorm.weight``/``bias``.
    """
    if prefix and key.startswith(prefix + "."):
        return canonical(key[len(prefix) + 1 :])
    if is_head_key(key):
        return None
    return canonical(key)


def backbone_map(
    keys: list[str], prefix: str, where: str = "checkpoint", heads: bool = False
) -> dict[str, str]:
    """Map name -> original key: backbone names of the non-head ``keys`` (order kept), a tied
    output embedding stored without its input embedding under the backbone name it stands for
    (``TIED_HEAD_ALIASES``), and with ``heads`` every other head key under its own (canonical)
    name.

    Raises:
        CmmergeError: Two keys map to one name (e.g. both ``roberta.x`` and ``x``).
    """
    out: dict[str, str] = {}

    def add(name: str, key: str) -> None:
        if name in out:
            raise CmmergeError(f"{where}: keys {out[name]!r} and {key!r} both map to {name!r}")
        out[name] = key

    head_keys = []
    for key in keys:
        name = backbone_key(key, prefix)
        if name is None:
            head_keys.append(key)
        else:
            add(name, key)
    aliases = set()
    for alias, name in TIED_HEAD_ALIASES.items():
        if alias in head_keys and name not in out:
            out[name] = alias
            aliases.add(alias)
    if heads:
        for key in head_keys:
            if key not in aliases:
                add(canonical(key), key)
    return out
