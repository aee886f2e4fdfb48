"""Data a stage needs, assembled from the config: task splits and the leakage-free CPT corpus."""

from __future__ import annotations

from datasets import DatasetDict
from omegaconf import DictConfig

from cmmerge.data import build_corpus, load_corpus_texts, load_task, normalize_text
from cmmerge.settings import data_root, plain, task_config


def split_seed(cfg: DictConfig) -> int:
    """Seed of carved-out validation splits: fixed across training seeds (``data.split_seed``)."""
    return int(cfg.data.get("split_seed", 0))


def task_splits(cfg: DictConfig, name: str | None = None) -> DatasetDict:
    """Train / validation / test of ``name`` (default: the configured task)."""
    task = task_config(cfg, name or str(cfg.task.name))
    return load_task(plain(task), data_root(cfg), seed=split_seed(cfg))


def leakage_tasks(cfg: DictConfig) -> list[str]:
    """Tasks whose validation and test texts must never be in a CPT corpus."""
    names = list(cfg.data.get("leakage_tasks") or [])
    if cfg.task.name not in names:
        names.append(str(cfg.task.name))
    return names


def evaluation_texts(cfg: DictConfig) -> set[str]:
    """Normalised validation and test texts of every leakage task whose files exist."""
    texts: set[str] = set()
    for name in leakage_tasks(cfg):
        splits = load_task(plain(task_config(cfg, name)), data_root(cfg), seed=split_seed(cfg))
        for split in ("validation", "test"):
            texts.update(normalize_text(t) for t in splits[split]["text"])
    return texts


def cpt_corpus(cfg: DictConfig) -> tuple[list[str], dict]:
    """The CPT corpus (normalised, de-duplicated, evaluation texts removed) and its counts."""
    raw = load_corpus_texts(plain(cfg.corpus), data_root(cfg), seed=split_seed(cfg))
    texts, stats = build_corpus(raw, evaluation_texts(cfg))
    stats["leakage_tasks"] = leakage_tasks(cfg)
    return texts, stats
