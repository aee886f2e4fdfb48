"""Unlabelled corpora for continued pre-training: loading, normalisation, dedup, leakage guard.

A corpus config (``configs/corpus/<name>.yaml``) has the keys ``name``, ``sources`` (a list of
``{path, format}`` with paths relative to the data root and format one of ``token_per_line``,
``sentimix_conll``, ``text_lines``) and ``task_train_sets`` (task names whose *train* split texts
are added to the corpus).
"""

from __future__ import annotations

import importlib.resources
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path

from cmmerge.data.formats import (
    parse_sentimix_conll,
    parse_text_lines,
    parse_token_per_line,
    resolve_path,
)
from cmmerge.data.tasks import as_dict, load_task
from cmmerge.errors import CmmergeError

SOURCE_FORMATS = ("token_per_line", "sentimix_conll", "text_lines")


def normalize_text(text: str) -> str:
    """Unicode NFC, every run of whitespace collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def load_task_config(name: str) -> dict:
    """Load ``configs/task/<name>.yaml`` shipped inside the package.

    Raises:
        CmmergeError: If the package has no such task config.
    """
    from omegaconf import OmegaConf

    resource = importlib.resources.files("cmmerge") / "configs" / "task" / f"{name}.yaml"
    if not resource.is_file():
        raise CmmergeError(f"no task config {name!r} in the package (configs/task/{name}.yaml)")
    return OmegaConf.to_container(OmegaConf.create(resource.read_text(encoding="utf-8")))  # type: ignore[return-value]


def _read_source(source: Mapping, data_root: str | Path, where: str) -> list[str]:
    """Read the texts of one corpus source ``{path, format}``."""
    if not isinstance(source, Mapping) or not source.get("path"):
        raise CmmergeError(f"{where}: each source needs a 'path' (and a 'format'), got {source!r}")
    fmt = source.get("format", "token_per_line")
    if fmt not in SOURCE_FORMATS:
        raise CmmergeError(f"{where}: unknown format {fmt!r} (known: {list(SOURCE_FORMATS)})")
    path = resolve_path(data_root, source["path"], where)
    if fmt == "sentimix_conll":
        return [record.text for record in parse_sentimix_conll(path, where)]
    if fmt == "text_lines":
        return parse_text_lines(path, where)
    return parse_token_per_line(path, where)


def load_corpus_texts(
    corpus_cfg: Mapping,
    data_root: str | Path,
    task_cfgs: Mapping[str, Mapping] | None = None,
    seed: int = 0,
) -> list[str]:
    """Return the raw texts of a corpus: its sources, then the train texts of its tasks.

    Only the ``train`` split of each task in ``task_train_sets`` is added (after any validation
    carve-out with ``seed``), so validation and test texts never enter the corpus this way. The
    texts are not normalised or de-duplicated: pass them to :func:`build_corpus`.

    Args:
        corpus_cfg: The corpus config (``cfg.corpus``).
        data_root: Folder the config's paths are relative to (``data.root``).
        task_cfgs: Task name -> task config. A task named in the corpus config but absent here
            (or all of them, when ``None``) is read from the package's
            ``configs/task/<name>.yaml``.
        seed: Seed passed to :func:`load_task` for the validation carve-out.

    Raises:
        CmmergeError: On a bad config or bad source file.
    """
    cfg = as_dict(corpus_cfg)
    name = cfg.get("name") or "?"
    sources = cfg.get("sources") or []
    if not isinstance(sources, list):
        raise CmmergeError(f"corpus {name}: 'sources' must be a list of {{path, format}}")
    texts: list[str] = []
    for i, source in enumerate(sources):
        texts.extend(_read_source(source, data_root, f"corpus {name}, sources[{i}]"))
    task_names = cfg.get("task_train_sets") or []
    given = {} if task_cfgs is None else dict(task_cfgs)
    for task_name in task_names:
        task_cfg = given[task_name] if task_name in given else load_task_config(task_name)
        texts.extend(load_task(task_cfg, data_root, seed=seed)["train"]["text"])
    if not sources and not task_names:
        raise CmmergeError(f"corpus {name}: no 'sources' and no 'task_train_sets'")
    return texts


def build_corpus(texts: Iterable[str], exclude: Iterable[str]) -> tuple[list[str], dict]:
    """Normalise texts, drop empties, duplicates and evaluation texts (leakage guard).

    Each text is normalised with :func:`normalize_text`. A text is dropped as empty if nothing is
    left, as leakage if its normalised form equals a normalised ``exclude`` text (every
    occurrence), and as a duplicate if it was kept before; first occurrences keep their order.

    Args:
        texts: Raw corpus texts.
        exclude: Texts that must not be in the corpus (every validation and test text).

    Returns:
        ``(kept_texts, stats)`` with stats keys ``raw``, ``empty_removed``,
        ``duplicates_removed``, ``leakage_removed`` and ``kept``.
    """
    banned = {normalize_text(text) for text in exclude}
    banned.discard("")
    stats = dict.fromkeys(("raw", "empty_removed", "duplicates_removed", "leakage_removed"), 0)
    seen: set[str] = set()
    kept: list[str] = []
    for text in texts:
        stats["raw"] += 1
        norm = normalize_text(text)
        if not norm:
            stats["empty_removed"] += 1
        elif norm in banned:
            stats["leakage_removed"] += 1
        elif norm in seen:
            stats["duplicates_removed"] += 1
        else:
            seen.add(norm)
            kept.append(norm)
    stats["kept"] = len(kept)
    return kept, stats
