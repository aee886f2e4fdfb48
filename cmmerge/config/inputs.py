"""Data a stage needs, assembled from the config: task splits and the leakage-free CPT corpus."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from cmmerge.config.chain import require_upstream
from cmmerge.config.specs import init_spec
from cmmerge.config.values import cache_dir, data_root, leakage_tasks, split_seed, task_config
from cmmerge.data.guard import GuardedCorpus, task_paths
from cmmerge.data.splits import config_root
from cmmerge.io.manifest import sha256_bytes
from cmmerge.models.loading import ModelSource, local_model_dir
from cmmerge.presets import plain
from cmmerge.stages.runner import folder_input, stage_input

if TYPE_CHECKING:  # the data layer (datasets, pandas) is imported by the stages that read data
    from datasets import DatasetDict

log = logging.getLogger("cmmerge")


def model_source(cfg: DictConfig) -> ModelSource:
    """The run's base model (``cfg.model``), typed."""
    model = plain(cfg.model)
    return ModelSource.from_preset(model, cache_dir(cfg), bool(cfg.get("allow_pickle")))


def resolve_model(cfg: DictConfig) -> Path:
    """A local folder of the run's base model (:meth:`ModelSource.resolve`)."""
    return model_source(cfg).resolve()


def task_splits(cfg: DictConfig, name: str | None = None) -> DatasetDict:
    """Train / validation / test of ``name`` (default: the configured task)."""
    from cmmerge.data import load_task

    task = task_config(cfg, name or str(cfg.task.name))
    return load_task(plain(task), data_root(cfg), seed=split_seed(cfg))


def task_splits_with_info(cfg: DictConfig, name: str | None = None) -> tuple[DatasetDict, dict]:
    """:func:`task_splits` and what happened to each split (rows read, blank texts dropped...)."""
    from cmmerge.data import load_task_with_info

    task = task_config(cfg, name or str(cfg.task.name))
    splits, info = load_task_with_info(plain(task), data_root(cfg), seed=split_seed(cfg))
    return splits.remove_columns("tags"), info


def task_labels(cfg: DictConfig, name: str | None = None) -> list[str]:
    """The label set of ``name`` (default: the configured task): ``task.labels``, or the sorted
    labels of its train file when that is null."""
    from cmmerge.data.tasks import resolve_labels

    task = task_config(cfg, name or str(cfg.task.name))
    return resolve_labels(plain(task), data_root(cfg))


def _task_paths(cfg: DictConfig, name: str) -> list[tuple[str, Path]]:
    """``(as configured, full path)`` of each file of task ``name`` ([] for hub tasks)."""
    return task_paths(plain(task_config(cfg, name)), data_root(cfg))


def guarded_corpus(cfg: DictConfig, leakage: list[str] | None = None) -> GuardedCorpus:
    """The CPT corpus to build: ``cfg.corpus`` less the validation and test texts of the
    ``leakage`` tasks (default :func:`leakage_tasks`); the configured task and ``eval_tasks``
    must load, another guarded task whose files are missing is skipped (and listed)."""
    names = leakage_tasks(cfg) if leakage is None else leakage
    return GuardedCorpus(
        corpus=plain(cfg.corpus),
        data_root=data_root(cfg),
        split_seed=split_seed(cfg),
        guarded=tuple(plain(task_config(cfg, n)) for n in names),
        required=frozenset({str(cfg.task.name), *[str(t) for t in cfg.get("eval_tasks") or []]}),
    )


def evaluation_texts(cfg: DictConfig) -> set[str]:
    """Normalised validation and test texts of every leakage task whose files exist."""
    return guarded_corpus(cfg).evaluation_texts()[0]


def cpt_corpus(cfg: DictConfig, leakage: list[str] | None = None) -> tuple[list[str], dict]:
    """The CPT corpus (normalised, de-duplicated, the evaluation texts of the ``leakage`` tasks,
    default :func:`leakage_tasks`, removed) and its counts."""
    texts, stats, _ = guarded_corpus(cfg, leakage).load()
    return texts, stats


def corpus_input(cfg: DictConfig, texts: list[str]) -> dict:
    """The manifest input that stands for a CPT corpus: the SHA-256 of its texts in order.

    The corpus, not the settings that shaped it, identifies a CPT: adding a task whose texts
    are already excluded to ``data.leakage_tasks`` (as training that task does) leaves it the
    same stage."""
    blob = json.dumps(texts, ensure_ascii=False).encode()
    return {"corpus": str(cfg.corpus.name), "texts": len(texts), "sha256": sha256_bytes(blob)}


def _task_files(cfg: DictConfig, name: str) -> list[Path]:
    """The files of task ``name`` that exist (none for hub tasks)."""
    return [path for _, path in _task_paths(cfg, name) if path.is_file()]


def _corpus_files(cfg: DictConfig) -> list[Path]:
    corpus = plain(cfg.corpus)
    root = config_root(corpus, data_root(cfg))
    paths = [root / str(s["path"]) for s in corpus.get("sources") or [] if isinstance(s, dict)]
    return [p for p in paths if p.is_file()]


def data_inputs(
    cfg: DictConfig, tasks: list[str], corpus: bool = False, guard: bool = False
) -> list[dict]:
    """Manifest inputs for the data files a stage reads, identified by content (SHA-256,
    remembered by path, size and modification time): editing a file redoes the stage.

    ``corpus`` adds the corpus sources and the task train sets it takes in, and with ``guard``
    the files of every leakage task (whose evaluation texts it leaves out)."""
    from cmmerge.config.values import cache_dir
    from cmmerge.io.hashes import content_digest

    files: list[Path] = []
    for name in tasks:
        files += _task_files(cfg, name)
    if corpus:
        files += _corpus_files(cfg)
        guarded = leakage_tasks(cfg) if guard else []
        for name in [*guarded, *(cfg.corpus.get("task_train_sets") or [])]:
            files += _task_files(cfg, str(name))
    cache = cache_dir(cfg)
    unique = list(dict.fromkeys(files))
    return [{"path": str(f), "sha256": content_digest(f, cache)} for f in unique]


def init_model(cfg: DictConfig) -> tuple[Path, dict]:
    """The model folder fine-tuning starts from and its manifest input entry."""
    init = str(cfg.init)
    require_upstream(cfg, "finetune")  # every missing stage of the chain, named at once
    if init == "base":
        path = resolve_model(cfg)
        return path, folder_input(path)
    if init in ("cpt", "merged"):  # the stage fine-tuning starts from, by its spec
        start = init_spec(cfg)
        return start.folder / "model", stage_input(start.folder, start.cli_hint())
    path = local_model_dir(init, bool(cfg.get("allow_pickle")))
    return path, folder_input(path)
