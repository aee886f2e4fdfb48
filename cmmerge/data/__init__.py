"""Data loading: SentiMix task splits, unlabelled CPT corpora, normalisation and leakage guard."""

from cmmerge.data.corpus import build_corpus, load_corpus_texts, load_task_config, normalize_text
from cmmerge.data.tasks import label_distribution, load_task, samples_root

__all__ = [
    "build_corpus",
    "label_distribution",
    "load_corpus_texts",
    "load_task",
    "load_task_config",
    "normalize_text",
    "samples_root",
]
