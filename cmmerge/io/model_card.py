"""README model cards for model folders cmmerge writes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmmerge import __version__


def write_model_card(model_dir: Path, title: str, summary: str, facts: Mapping[str, Any]) -> None:
    """A README.md saying how the model was made (method, settings, sources, versions)."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    text = (
        f"---\nlibrary_name: transformers\ntags: [cmmerge, code-mixed]\n---\n\n# {title}\n\n"
        f"{summary}\n\n| key | value |\n|---|---|\n{rows}\n| cmmerge | {__version__} |\n"
    )
    (Path(model_dir) / "README.md").write_text(text, encoding="utf-8")
