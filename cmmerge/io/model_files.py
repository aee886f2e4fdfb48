"""The non-weight files of model folders cmmerge writes: copied from the model a folder was
made from (config, tokenizer, generation settings), and ``config.json`` edited to say what the
written weights are (their dtype, a vocabulary grown by CPT)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# The dtypes a merge, graft or extraction may write its weights in (``dtype=``).
WRITE_DTYPES = ("float32", "float16", "bfloat16")
# Files of a model folder that are not weights: config, tokenizer, generation settings.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_SKIP_NAMES = {
    "README.md",
    "manifest.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}
# The tokenizer's files (each name starts with one of these).
TOKENIZER_PREFIXES = (
    "tokenizer",
    "special_tokens",
    "vocab",
    "merges",
    "sentencepiece",
    "added_tokens",
)


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(Path(src).iterdir()):
        if (
            path.is_file()
            and path.name not in _SKIP_NAMES
            and not path.name.startswith(".")
            and not path.name.endswith(WEIGHT_SUFFIXES)
        ):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def _read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def _write_config(model_dir: Path, config: dict[str, Any]) -> None:
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def record_dtype(model_dir: Path, dtype: str) -> None:
    """config.json says the dtype the weights were written in (``dtype``, and ``torch_dtype``
    where an older config has it), so ``from_pretrained`` loads them as they are."""
    config = _read_config(model_dir)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    _write_config(model_dir, config)


def record_grown_vocab(model_dir: Path, model_sources: list[Path], grown: dict[str, int]) -> None:
    """A vocabulary grown by CPT: the new size goes into config.json, and the tokenizer comes
    from the first of ``model_sources`` that has that size (a task vector carries none)."""
    config = _read_config(model_dir)
    rows = max(grown.values())
    config["vocab_size"] = rows
    _write_config(model_dir, config)
    for src in model_sources:
        if _read_config(src).get("vocab_size") == rows:
            for path in src.iterdir():
                if path.name.startswith(TOKENIZER_PREFIXES):
                    shutil.copy2(path, model_dir / path.name)
            break
