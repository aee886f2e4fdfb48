"""Data loading: task splits (SentiMix CoNLL, CSV/TSV/JSONL, hub), CPT corpora, leakage guard."""

from cmmerge.data.corpus import (
    build_corpus,
    leakage_key,
    load_corpus,
    load_corpus_texts,
    load_task_config,
    normalize_text,
)
from cmmerge.data.tasks import label_distribution, load_task, load_task_with_info, samples_root

__all__ = [
    "build_corpus",
    "label_distribution",
    "leakage_key",
    "load_corpus",
    "load_corpus_texts",
    "load_task",
    "load_task_config",
    "load_task_with_info",
    "normalize_text",
    "samples_root",
]
