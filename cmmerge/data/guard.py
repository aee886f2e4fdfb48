"""The CPT corpus with the evaluation texts of the guarded tasks kept out (the leakage guard),
from a typed request: what the ``data`` and ``cpt`` stages read, built once from the config at
the stage boundary (:func:`cmmerge.config.inputs.guarded_corpus`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmmerge.data.splits import SPLITS, config_root, split_file

log = logging.getLogger("cmmerge")


def task_paths(task: Mapping, data_root: Path) -> list[tuple[str, Path]]:
    """``(as configured, full path)`` of each file of a task ([] for hub tasks)."""
    if task.get("hub"):
        return []
    root = config_root(task, data_root)
    files = [split_file(task, s) for s in (*SPLITS, "test_labels")]
    return [(str(f), root / str(f)) for f in files if f]


def missing_files(task: Mapping, data_root: Path) -> list[str]:
    """Files of a task that are not under its root (``[]`` for hub tasks)."""
    return [f for f, path in task_paths(task, data_root) if not path.is_file()]


@dataclass(frozen=True)
class GuardedCorpus:
    """A CPT corpus to build: the corpus config, the data root, the seed of carved splits, the
    configs of the tasks whose validation and test texts are kept out (``guarded``), and the
    names among them that must load (the configured and evaluated tasks); a guarded task whose
    files are missing is otherwise skipped, and said so."""

    corpus: Mapping[str, Any]
    data_root: Path
    split_seed: int
    guarded: tuple[Mapping[str, Any], ...] = ()
    required: frozenset[str] = frozenset()

    def evaluation_texts(self) -> tuple[set[str], dict]:
        """Normalised validation and test texts of every guarded task, and what was read."""
        from cmmerge.data import load_task, normalize_text

        texts: set[str] = set()
        info: dict = {"tasks": {}, "skipped": {}}
        for task in self.guarded:
            name = str(task["name"])
            missing = [] if name in self.required else missing_files(task, self.data_root)
            if missing:
                log.warning(
                    "leakage guard: task %s skipped, files missing under %s: %s",
                    name,
                    self.data_root,
                    ", ".join(missing),
                )
                info["skipped"][name] = missing
                continue
            splits = load_task(dict(task), self.data_root, seed=self.split_seed)
            for split in ("validation", "test"):
                texts.update(normalize_text(t) for t in splits[split]["text"])
            info["tasks"][name] = {s: len(splits[s]) for s in ("validation", "test")}
        return texts, info

    def load(self) -> tuple[list[str], dict, dict]:
        """(the corpus texts, normalised, de-duplicated and guarded; their counts; the corpus
        sources read, with their word-tag counts)."""
        from cmmerge.data import build_corpus, load_corpus

        raw, sources = load_corpus(dict(self.corpus), self.data_root, seed=self.split_seed)
        banned, guard = self.evaluation_texts()
        texts, stats = build_corpus(raw, banned)
        stats["leakage_tasks"] = list(guard["tasks"])
        if guard["skipped"]:
            stats["leakage_tasks_skipped"] = guard["skipped"]
        if sources["missing_sources"]:
            stats["missing_sources"] = sources["missing_sources"]
        return texts, stats, sources
