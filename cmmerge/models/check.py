"""What is wrong with a model folder, in one line: a config.json that does not parse, a model
type transformers does not know (custom code in ``auto_map`` is never run), weights that are
missing, damaged or not plain tensors, or a config.json that disagrees with its weights.

Used before a merge writes anything (the base gives the output its config) and by the error
boundary (:func:`cmmerge.stages.runner.as_user_error`) to name the folder a library failed on.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import CheckpointReader

_CONFIG_KEYS_SHOWN = 3


def model_folder_problem(model_dir: Path, shapes: bool = True) -> str | None:
    """Why the Hugging Face folder ``model_dir`` cannot be loaded, or None when no fault is
    found (its config, model type, weights and, with ``shapes``, their agreement)."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"its config.json does not read as JSON ({type(err).__name__})"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    unknown = _unknown_type(config)
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
    return config_mismatch(model_dir, entries) if shapes else None


def check_model_folder(model_dir: Path, what: str = "model") -> None:
    """Raise one CmmergeError naming ``model_dir`` when :func:`model_folder_problem` finds a
    fault."""
    problem = model_folder_problem(model_dir)
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
