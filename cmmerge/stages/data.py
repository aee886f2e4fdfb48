"""`cmmerge data`: what to check before training -> data/stats.json, and a summary on stdout.

Split sizes (and the rows read, dropped and joined to get them), label distribution per split,
token length percentiles with the model's tokenizer, code-mixing index where word-level language
tags exist, texts shared between splits, and the CPT corpus with duplicates and leakage removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cmmerge.config.specs import DataSpec, thaw
from cmmerge.data import label_distribution, load_task_with_info
from cmmerge.data.guard import GuardedCorpus
from cmmerge.data.stats import code_mixing, split_overlap, token_lengths
from cmmerge.data.tasks import dataset_labels
from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import write_json_atomic
from cmmerge.models.loading import ModelSource

log = logging.getLogger("cmmerge")


@dataclass(frozen=True)
class DataJob:
    """What :func:`work` reads: the stage's spec (task, data root, split seed), the corpus to
    build, the model folder whose tokenizer counts lengths (None: not counted) and the cache."""

    spec: DataSpec
    corpus: GuardedCorpus
    model: ModelSource | None
    cache: Path


def _tokenizer(model: ModelSource | None):
    """The model's tokenizer, or ``None`` (with the reason logged) when it cannot be loaded."""
    if model is None:
        return None
    from cmmerge.models.loading import load_tokenizer

    try:
        return load_tokenizer(model.resolve())
    except CmmergeError as err:
        log.warning("data: no token lengths (%s)", err)
        return None


def collect_stats(job: DataJob) -> dict:
    """What a person checks before training: sizes, labels, lengths, mixing, corpus leakage."""
    task_cfg = thaw(job.spec.task)
    root = Path(job.spec.data_root)
    splits, info = load_task_with_info(task_cfg, root, seed=job.corpus.split_seed)
    labels = dataset_labels(splits["train"])  # task.labels, or inferred (words' for token tasks)
    tokenizer = _tokenizer(job.model)
    cache = job.cache if tokenizer is not None else None
    lang_tags = task_cfg.get("language_tags") or {}
    per_split = {}
    for name, ds in splits.items():
        entry = dict(info[name])
        if tokenizer is not None:
            entry["token_lengths"] = token_lengths(ds["text"], tokenizer, cache)
        mixing = code_mixing((Counter(tags) for tags in ds["tags"]), lang_tags)
        if mixing:
            entry["code_mixing"] = mixing
        per_split[name] = entry
    texts, corpus, sources = job.corpus.load()
    lang_tags = job.corpus.corpus.get("language_tags") or {}
    corpus["sources"] = sources["sources"]
    corpus["task_train_sets"] = sources["task_train_sets"]
    corpus_mixing = code_mixing((s["tag_counts"] for s in sources["sources"]), lang_tags)
    if corpus_mixing:
        corpus_mixing.pop("cmi_mean")  # per source, not per text: no utterance CMI here
        corpus_mixing.pop("mixed_texts_share")
        corpus["code_mixing"] = corpus_mixing
    if tokenizer is not None:
        corpus["token_lengths"] = token_lengths(texts, tokenizer, cache)
    return {
        "data_root": str(root),
        "tokenizer": None if tokenizer is None else str(tokenizer.name_or_path),
        "task": {
            "name": str(task_cfg["name"]),
            "labels": labels,
            "sizes": {name: len(ds) for name, ds in splits.items()},
            "label_distribution": label_distribution(splits.remove_columns("tags"), labels),
            "splits": per_split,
            "overlap": split_overlap({name: ds["text"] for name, ds in splits.items()}),
        },
        "corpus": {"name": str(job.corpus.corpus["name"]), **corpus},
    }


def _fmt_lengths(lengths: dict) -> str:
    if not lengths:
        return "-"
    return " ".join(f"{k}={lengths[k]:g}" for k in ("p50", "p90", "p95", "p99", "max"))


def summary(stats: dict) -> str:
    """A short human-readable report of :func:`collect_stats`."""
    task, corpus = stats["task"], stats["corpus"]
    lines = [
        f"data root: {stats['data_root']}",
        f"task {task['name']} (labels {', '.join(task['labels'])})",
    ]
    for name, entry in task["splits"].items():
        dist = task["label_distribution"][name]
        counts = " / ".join(f"{label} {n:,}" for label, n in dist.items())
        notes = [
            f"{k.replace('_', ' ')} {v}"
            for k, v in entry.items()
            if k
            in (
                "read",
                "dropped_by_label_map",
                "blank_dropped",
                "continuation_lines_joined",
                "filtered_out",
                "mojibake_repaired",
                "carved_fraction",
            )
        ]
        lines.append(f"  {name:<10} {entry['size']:>6,}  {counts}   [{'; '.join(notes)}]")
        if "token_lengths" in entry:
            lines.append(f"  {'':<10} tokens {_fmt_lengths(entry['token_lengths'])}")
        if "code_mixing" in entry:
            mix = entry["code_mixing"]
            shares = ", ".join(f"{k} {v:.1%}" for k, v in mix["language_share"].items())
            lines.append(
                f"  {'':<10} languages {shares}; other {mix['other_share']:.1%}; "
                f"CMI {mix['cmi_mean']:.1f}"
            )
    overlap = ", ".join(f"{k} {v}" for k, v in task["overlap"].items())
    lines.append(f"  texts shared / repeated: {overlap}")
    sources = ", ".join(f"{Path(s['path']).name} {s['texts']:,}" for s in corpus["sources"])
    added = ", ".join(f"{k} train {v:,}" for k, v in corpus["task_train_sets"].items())
    lines.append(f"corpus {corpus['name']}: {corpus['raw']:,} texts ({sources}; {added})")
    lines.append(
        f"  kept {corpus['kept']:,}; removed: duplicates {corpus['duplicates_removed']:,}"
        f", leakage {corpus['leakage_removed']:,}, empty {corpus['empty_removed']:,}"
        f" (evaluation texts of {', '.join(corpus['leakage_tasks'])})"
    )
    for key in ("leakage_tasks_skipped", "missing_sources"):
        if corpus.get(key):
            lines.append(f"  {key.replace('_', ' ')}: {corpus[key]}")
    if "token_lengths" in corpus:
        lines.append(f"  tokens {_fmt_lengths(corpus['token_lengths'])}")
    if "code_mixing" in corpus:
        share = corpus["code_mixing"]["language_share"]
        shares = ", ".join(f"{k} {v:.1%}" for k, v in share.items())
        lines.append(f"  languages {shares}")
    return "\n".join(lines)


def work(job: DataJob, stage_dir: Path) -> dict:
    """Collect the statistics into ``stage_dir/stats.json``."""
    stats = collect_stats(job)
    write_json_atomic(stage_dir / "stats.json", stats)
    metrics = {f"{split}_size": n for split, n in stats["task"]["sizes"].items()}
    metrics.update(
        corpus_kept=stats["corpus"]["kept"],
        corpus_duplicates_removed=stats["corpus"]["duplicates_removed"],
        corpus_leakage_removed=stats["corpus"]["leakage_removed"],
    )
    return {"metrics": metrics, "outputs": ["stats.json"]}
