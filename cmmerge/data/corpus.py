"""Unlabelled corpora for continued pre-training: loading, normalisation, dedup, leakage guard.

A corpus config (``configs/corpus/<name>.yaml``) has the keys ``name``, ``sources`` (a list of
``{path, format, text_column, required}``; paths relative to ``root`` or ``data.root``; format one
of ``token_per_line``, ``sentimix_conll``, ``text_lines``, ``csv``, ``tsv``, ``jsonl``, ``auto``;
a source with ``required: false`` is skipped, and reported, when its file is missing), ``paths``
(more sources, format ``format`` with ``text_column``: the ``custom`` corpus), ``language_tags``
(word tag -> language, for the code-mixing statistics) and ``task_train_sets`` (task names whose
*train* split texts are added to the corpus).
"""

from __future__ import annotations

import logging
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from cmmerge.data.formats import (
    parse_sentimix_conll,
    parse_tagged_tokens,
    parse_text_lines,
    resolve_path,
)
from cmmerge.data.splits import config_root
from cmmerge.data.tables import TABLE_FORMATS, canonical_format, detect_format, read_table
from cmmerge.data.tasks import as_dict, load_task
from cmmerge.errors import CmmergeError

SOURCE_FORMATS = ("token_per_line", "sentimix_conll", "text_lines", *TABLE_FORMATS, "auto")
log = logging.getLogger("cmmerge")


def normalize_text(text: str) -> str:
    """Unicode NFC, every run of whitespace collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def leakage_key(text: str) -> str:
    """The letters and digits of ``text``, NFKC and case-folded: equal keys are the same text
    up to tokenisation, spacing, punctuation and case (SentiMix splits ``can't`` into tokens)."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def _source_format(fmt: str, path: Path, where: str) -> str:
    """``auto``: CSV / TSV / JSONL by suffix, SentiMix CoNLL by its header, else one text a line."""
    if fmt != "auto":
        return fmt
    detected = detect_format(path, where)
    if detected == "sentimix_conll" or path.suffix.lower() in (
        ".csv",
        ".tsv",
        ".tab",
        ".jsonl",
        ".ndjson",
        ".json",
    ):
        return detected
    return "text_lines"


def _read_source(source: Mapping, root: Path, where: str) -> tuple[list[str], dict] | None:
    """Texts and info of one corpus source; ``None`` when an optional source is missing."""
    if not isinstance(source, Mapping) or not source.get("path"):
        raise CmmergeError(f"{where}: each source needs a 'path' (and a 'format'), got {source!r}")
    fmt = canonical_format(source.get("format", "token_per_line"))
    if fmt not in SOURCE_FORMATS:
        raise CmmergeError(f"{where}: unknown format {fmt!r} (known: {list(SOURCE_FORMATS)})")
    if source.get("required", True) is False and not (root / str(source["path"])).is_file():
        log.debug("%s: optional file %s not under %s: skipped", where, source["path"], root)
        return None
    path = resolve_path(root, source["path"], where)
    fmt = _source_format(fmt, path, where)
    tags: Counter[str] = Counter()
    if fmt == "sentimix_conll":
        records = parse_sentimix_conll(path, where)
        texts = [r.text for r in records]
        for r in records:
            tags.update(r.tags)
    elif fmt == "token_per_line":
        tagged = parse_tagged_tokens(path, where)
        texts = [t.text for t in tagged]
        for t in tagged:
            tags.update(t.tags)
    elif fmt == "text_lines":
        texts = parse_text_lines(path, where)
    else:
        column = source.get("text_column", "text")
        texts = [r.text for r in read_table(path, fmt, where, column, None)]
    tags.pop("", None)
    return texts, {
        "path": str(path),
        "format": fmt,
        "texts": len(texts),
        "tag_counts": dict(sorted(tags.items())),
    }


def load_task_config(name: str) -> dict:
    """Load ``configs/task/<name>.yaml`` shipped inside the package, as a plain dict.

    Raises:
        CmmergeError: If the package has no such task config (the message lists the tasks).
    """
    from cmmerge.presets import load_group_config, plain

    return plain(load_group_config("task", name))


def load_corpus(
    corpus_cfg: Mapping,
    data_root: str | Path,
    task_cfgs: Mapping[str, Mapping] | None = None,
    seed: int = 0,
) -> tuple[list[str], dict]:
    """Return the raw texts of a corpus (its sources, then the train texts of its tasks) and
    ``{sources: [...], missing_sources: [...], task_train_sets: {task: n}}``.

    Only the ``train`` split of each task in ``task_train_sets`` is added (after any carve-out
    with ``seed``), so validation and test texts never enter the corpus this way. The texts are
    not normalised or de-duplicated: pass them to :func:`build_corpus`.

    Args:
        corpus_cfg: The corpus config (``cfg.corpus``).
        data_root: Folder the config's paths are relative to (``data.root``), unless the config
            has its own ``root``.
        task_cfgs: Task name -> task config. A task named in the corpus config but absent here
            (or all of them, when ``None``) is read from the package's
            ``configs/task/<name>.yaml``.
        seed: Seed passed to :func:`load_task` for the carve-outs.

    Raises:
        CmmergeError: On a bad config or bad source file.
    """
    cfg = as_dict(corpus_cfg)
    name = cfg.get("name") or "?"
    root = config_root(cfg, data_root)
    sources = cfg.get("sources") or []
    if not isinstance(sources, list):
        raise CmmergeError(f"corpus {name}: 'sources' must be a list of {{path, format}}")
    paths = cfg.get("paths") or []
    if isinstance(paths, str):
        paths = [paths]
    fmt, column = cfg.get("format", "auto"), cfg.get("text_column", "text")
    sources = [*sources, *({"path": p, "format": fmt, "text_column": column} for p in paths)]
    texts: list[str] = []
    info: dict = {"sources": [], "missing_sources": [], "task_train_sets": {}}
    for i, source in enumerate(sources):
        read = _read_source(source, root, f"corpus {name}, source {i} ({source.get('path')})")
        if read is None:
            info["missing_sources"].append(str(source["path"]))
            continue
        texts.extend(read[0])
        info["sources"].append(read[1])
    task_names = cfg.get("task_train_sets") or []
    given = {} if task_cfgs is None else dict(task_cfgs)
    for task_name in task_names:
        task_cfg = given[task_name] if task_name in given else load_task_config(task_name)
        train = load_task(task_cfg, data_root, seed=seed)["train"]["text"]
        texts.extend(train)
        info["task_train_sets"][task_name] = len(train)
    if not sources and not task_names:
        raise CmmergeError(
            f"corpus {name}: no 'sources', 'paths' or 'task_train_sets' "
            "(for corpus=custom set corpus.paths=[FILE,...])"
        )
    return texts, info


def load_corpus_texts(
    corpus_cfg: Mapping,
    data_root: str | Path,
    task_cfgs: Mapping[str, Mapping] | None = None,
    seed: int = 0,
) -> list[str]:
    """The texts of :func:`load_corpus`."""
    return load_corpus(corpus_cfg, data_root, task_cfgs, seed)[0]


def build_corpus(texts: Iterable[str], exclude: Iterable[str]) -> tuple[list[str], dict]:
    """Normalise texts, drop empties, duplicates and evaluation texts (leakage guard).

    Each text is normalised with :func:`normalize_text`. A text is dropped as empty if nothing is
    left, as leakage if its normalised form or its :func:`leakage_key` equals that of an
    ``exclude`` text (every occurrence), and as a duplicate if it was kept before; first
    occurrences keep their order.

    Args:
        texts: Raw corpus texts.
        exclude: Texts that must not be in the corpus (every validation and test text).

    Returns:
        ``(kept_texts, stats)`` with stats keys ``raw``, ``empty_removed``,
        ``duplicates_removed``, ``leakage_removed`` and ``kept``.
    """
    exclude = list(exclude)
    banned = {normalize_text(text) for text in exclude}
    banned_keys = {leakage_key(text) for text in exclude}
    banned.discard("")
    banned_keys.discard("")
    stats = dict.fromkeys(("raw", "empty_removed", "duplicates_removed", "leakage_removed"), 0)
    seen: set[str] = set()
    kept: list[str] = []
    for text in texts:
        stats["raw"] += 1
        norm = normalize_text(text)
        if not norm:
            stats["empty_removed"] += 1
        elif norm in banned or leakage_key(norm) in banned_keys:
            stats["leakage_removed"] += 1
        elif norm in seen:
            stats["duplicates_removed"] += 1
        else:
            seen.add(norm)
            kept.append(norm)
    stats["kept"] = len(kept)
    return kept, stats
