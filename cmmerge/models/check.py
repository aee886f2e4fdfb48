"""What is wrong with a model folder, in one line: a config.json that does not parse, a model
type transformers does not know (custom code in ``auto_map`` is never run), weights that are
missing, damaged or not plain tensors, or a config.json that disagrees with its weights.

Used before a merge writes anything (the base gives the output its config) and by the error
boundary (:func:`cmmerge.stages.runner.as_user_error`) to name the folder a library failed on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader

_CONFIG_KEYS_SHOWN = 3


def model_folder_problem(model_dir: Path, shapes: bool = True, deep: bool = True) -> str | None:
    """Why the Hugging Face folder ``model_dir`` cannot be loaded, or None when no fault is
    found (its config, model type, weights and, with ``shapes``, their agreement).

    ``deep`` builds the architecture on the meta device to compare every shape (importing
    transformers: seconds); without it the config's width and depth are compared with the
    embedding and the layer numbers in the weights' names (what a merge needs, in
    milliseconds), and the model type is not looked up."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"its config.json does not read as JSON ({type(err).__name__})"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    unknown = _unknown_type(config) if deep else None
    if unknown:
        return unknown
    try:
        reader = CheckpointReader(model_dir, allow_pickle=True)
    except CmmergeError as bad:
        return str(bad)
    try:
        entries = {key: tuple(reader.shape(key)) for key in reader.keys()}
    finally:
        reader.close()
    if not shapes:
        return None
    return config_mismatch(model_dir, entries) if deep else outline_mismatch(config, entries)


def check_model_folder(model_dir: Path, what: str = "model", deep: bool = True) -> None:
    """Raise one CmmergeError naming ``model_dir`` when :func:`model_folder_problem` finds a
    fault."""
    problem = model_folder_problem(model_dir, deep=deep)
    if problem is not None:
        raise CmmergeError(f"cannot use the {what} in {model_dir}: {problem}")


def _unknown_type(config: dict) -> str | None:
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING_NAMES:
        return None  # none given: transformers says what it makes of the folder
    if config.get("auto_map"):
        return (
            f"model type {model_type!r} is not one transformers {__version__} knows, and its "
            "own code (auto_map) is never run by cmmerge: choose a model transformers supports"
        )
    return (
        f"model type {model_type!r} is not one transformers {__version__} knows "
        "(a newer transformers may; or choose another model)"
    )


def config_mismatch(model_dir: Path, entries: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensor whose shape in the weights (``entries``: name -> shape) is not the
    shape config.json gives it, with the config keys that explain it; None when they agree
    (or when the architecture cannot be built to tell)."""
    expected, prefix, config = _expected_shapes(model_dir)
    if not expected:
        return None
    for key, shape in entries.items():
        for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if name in expected:
                want = expected[name]
                if want != shape and not _grown_rows(want, shape):
                    keys = _explaining_keys(config, want, shape)
                    return (
                        f"its config.json does not match its weights: {key} is "
                        f"{list(shape)} in the weights, {list(want)} by config.json{keys}; "
                        "fix config.json or use the folder the weights came with"
                    )
                break
    return None


_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_LAYER_INDEX = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)\.")


def outline_mismatch(config: dict, entries: dict[str, tuple[int, ...]]) -> str | None:
    """The config's width (hidden size) against the word embedding's columns and its depth
    (number of layers) against the layer numbers in the tensor names; None when they agree or
    cannot be told (no such keys, no embedding found)."""
    text = _text_config(config)
    embedding = [
        (key, shape)
        for key, shape in entries.items()
        if len(shape) == 2 and re.search(r"(word_embeddings|embed_tokens|wte)\.weight$", key)
    ]
    width = next((text[k] for k in _WIDTH_KEYS if isinstance(text.get(k), int)), None)
    if embedding and width is not None and embedding[0][1][1] != width:
        key, shape = embedding[0]
        return (
            f"its config.json does not match its weights: {key} is {list(shape)} in the "
            f"weights, hidden size {width} by config.json; fix config.json or use the folder "
            "the weights came with"
        )
    depth = next((text[k] for k in _DEPTH_KEYS if isinstance(text.get(k), int)), None)
    found = {int(m.group(1)) for key in entries for m in [_LAYER_INDEX.search(key)] if m}
    if depth is not None and found and max(found) + 1 != depth:
        return (
            f"its config.json does not match its weights: the weights hold {max(found) + 1} "
            f"layers, config.json says {depth}; fix config.json or use the folder the weights "
            "came with"
        )
    return None


def _text_config(config: dict) -> dict:
    """The language model's part of a config (``text_config`` of a multimodal one)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def _grown_rows(want: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Rows beyond config.json's vocab_size: an embedding padded to a multiple, not a fault."""
    return len(want) == len(shape) == 2 and want[1] == shape[1] and shape[0] > want[0]


def _expected_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], str, dict]:
    """``(parameter name -> shape, base_model_prefix, config)`` of the architecture config.json
    names, built on the meta device (no memory, no code from the folder); empty when it
    cannot be built."""
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, str(arch), None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else AutoModel.from_config(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return shapes, str(getattr(model, "base_model_prefix", "") or ""), config.to_dict()
    except Exception:  # noqa: BLE001 - an architecture that cannot be built: nothing to compare
        return {}, "", {}


def _explaining_keys(config: dict, want: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """`` (hidden_size=64?)``: the config keys whose value is a dimension that differs."""
    differing = {w for w, s in zip(want, shape, strict=False) if w != s}
    keys = [
        f"{k}={v}"
        for k, v in config.items()
        if isinstance(v, int) and not isinstance(v, bool) and v in differing
    ]
    return f" ({', '.join(keys[:_CONFIG_KEYS_SHOWN])}?)" if keys else ""
