"""`cmmerge data`: split sizes, label distributions and corpus leakage removed -> data/stats.json."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from cmmerge.data import label_distribution
from cmmerge.io.manifest import write_json_atomic
from cmmerge.settings import data_root, plain
from cmmerge.stages.ids import stage_dirs
from cmmerge.stages.inputs import cpt_corpus, task_splits
from cmmerge.stages.runner import run_stage, view


def collect_stats(cfg: DictConfig) -> dict:
    """What a person checks before training: sizes, labels, corpus counts and leakage."""
    splits = task_splits(cfg)
    labels = list(cfg.task.labels)
    _, corpus = cpt_corpus(cfg)
    return {
        "data_root": str(data_root(cfg)),
        "task": {
            "name": str(cfg.task.name),
            "labels": labels,
            "sizes": {name: len(ds) for name, ds in splits.items()},
            "label_distribution": label_distribution(splits, labels),
        },
        "corpus": {"name": str(cfg.corpus.name), **corpus},
    }


def run(cfg: DictConfig) -> dict:
    dirs = stage_dirs(cfg)
    config_view = view(cfg, "task", "corpus", data=plain(cfg.data),
                       data_root=str(data_root(cfg)), seed=int(cfg.seed), cpt_seed=cfg.cpt.seed)

    def work(stage_dir):
        stats = collect_stats(cfg)
        write_json_atomic(stage_dir / "stats.json", stats)
        print(json.dumps({k: stats[k] for k in ("task", "corpus")}, indent=2))
        metrics = {f"{split}_size": n for split, n in stats["task"]["sizes"].items()}
        metrics.update(corpus_kept=stats["corpus"]["kept"],
                       corpus_leakage_removed=stats["corpus"]["leakage_removed"])
        return {"metrics": metrics, "outputs": ["stats.json"]}

    return run_stage(cfg, "data", dirs["data"], config_view, [], work)
