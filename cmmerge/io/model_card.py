"""README model cards and sibling-file copies for model folders cmmerge writes."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmmerge import __version__

# Files of a model folder that are not weights: config, tokenizer, generation settings.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_SKIP_NAMES = {
    "README.md",
    "manifest.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}


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


def write_model_card(model_dir: Path, title: str, summary: str, facts: Mapping[str, Any]) -> None:
    """A README.md saying how the model was made (method, settings, sources, versions)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    text = (
        f"---\nlibrary_name: transformers\ntags: [cmmerge, code-mixed]\n---\n\n# {title}\n\n"
        f"{summary}\n\n| key | value |\n|---|---|\n{rows}\n| cmmerge | {__version__} |\n"
    )
    (Path(model_dir) / "README.md").write_text(text, encoding="utf-8")
