"""Data loading: task splits (SentiMix CoNLL, CSV/TSV/JSONL, hub), CPT corpora, leakage guard.

The names below are loaded on first use (PEP 562), so that a stage which only needs
:mod:`cmmerge.data.splits` (a merge) does not import ``datasets`` and ``pandas``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOMES = {
    "build_corpus": "corpus",
    "leakage_key": "corpus",
    "load_corpus": "corpus",
    "load_corpus_texts": "corpus",
    "load_task_config": "corpus",
    "normalize_text": "corpus",
    "label_distribution": "tasks",
    "load_task": "tasks",
    "load_task_with_info": "tasks",
    "samples_root": "tasks",
}

__all__ = [  # noqa: RUF022 (the order of _HOMES)
    "build_corpus",
    "leakage_key",
    "load_corpus",
    "load_corpus_texts",
    "load_task_config",
    "normalize_text",
    "label_distribution",
    "load_task",
    "load_task_with_info",
    "samples_root",
]

if TYPE_CHECKING:
    from cmmerge.data.corpus import (
        build_corpus,
        leakage_key,
        load_corpus,
        load_corpus_texts,
        load_task_config,
        normalize_text,
    )
    from cmmerge.data.tasks import label_distribution, load_task, load_task_with_info, samples_root


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
