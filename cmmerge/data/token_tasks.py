"""Token-level tasks (``task.type: token``): one label per word, e.g. word-level language
identification. :func:`load_token_task_with_info` builds train / validation / test from
word-tagged files.

Task config keys, besides those of :mod:`cmmerge.data.tasks` that apply (``name``, ``labels``,
``train`` / ``validation`` / ``test``, ``validation_fraction`` / ``test_fraction``, ``root``,
``fix_mojibake``):

- ``type: token`` (``sequence``, the default, is sentence classification).
- ``format``: ``sentimix_conll`` (``meta<TAB>uid[<TAB>label]`` header lines start sentences;
  the sentence label is ignored), ``conll_tokens`` (alias ``token_per_line``: ``word<TAB>tag``
  lines, a blank line between sentences), or ``auto`` (alias ``conll``; by the first line).
- ``label_map``: raw tag -> label (e.g. ``{Eng: en, Hin: hi, O: other, EMT: other}``); tags
  already in ``labels`` pass through. A word cannot be dropped: a ``null`` target is an error.

Each example has the columns ``text`` (the words joined with single spaces: what the leakage
guard and the statistics read), ``words``, ``word_labels`` (a label id per word) and ``tags``
(the raw tags). A split without a file is carved out of train, seeded, not stratified (a
sentence has many labels). An unknown tag or a word without a tag is an error naming the file
and line.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import ftfy

from cmmerge.data.formats import (
    TaggedSentence,
    lines_listed,
    parse_tagged_sentences,
    resolve_path,
)
from cmmerge.data.splits import SPLITS, carve_fractions, split_file
from cmmerge.data.tables import TOKEN_FORMATS, canonical_token_format, detect_token_format
from cmmerge.errors import CmmergeError

log = logging.getLogger("cmmerge")

TASK_TYPES = ("sequence", "token")
_FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False)
_LOGGED: set[tuple[str, tuple[str, ...]]] = set()


def task_type(task_cfg: Mapping) -> str:
    """``sequence`` (one label per text, the default) or ``token`` (one label per word)."""
    value = str(task_cfg.get("type") or "sequence")
    if value not in TASK_TYPES:
        raise CmmergeError(f"task {task_cfg.get('name', '?')}: type={value}: use sequence or token")
    return value


def is_token_task(task_cfg: Mapping) -> bool:
    """Whether the task labels words (``type: token``) rather than whole texts."""
    return task_type(task_cfg) == "token"


def _read_sentences(
    cfg: Mapping[str, Any], split: str, root: Path, info: dict
) -> tuple[list[TaggedSentence], str]:
    """The sentences of one split's file, and its path."""
    name = cfg["name"]
    what = f"task {name}, key {split}"
    if cfg.get("hub"):
        raise CmmergeError(f"task {name}: token-level tasks read word-tagged files, not the hub")
    path = resolve_path(root, split_file(cfg, split), what)  # type: ignore[arg-type]
    fmt = canonical_token_format(cfg.get("format"))
    if fmt == "auto":
        fmt = detect_token_format(path, what)
    if fmt not in TOKEN_FORMATS:
        raise CmmergeError(
            f"task {name}: format {fmt!r} has no word tags; a token-level task reads "
            f"{', '.join(TOKEN_FORMATS)} or auto"
        )
    info["format"] = fmt
    return parse_tagged_sentences(path, what, headers=fmt == "sentimix_conll"), str(path)


def _tag_map(cfg: Mapping[str, Any], names: list[str] | None) -> dict[str, str]:
    """The trimmed raw-tag map, checked against ``names`` (unless None); no ``null`` targets."""
    raw = cfg.get("label_map") or {}
    if not isinstance(raw, Mapping):
        raise CmmergeError(f"task {cfg['name']}: label_map must be a mapping, got {raw!r}")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            raise CmmergeError(
                f"task {cfg['name']}: label_map maps tag {key!r} to null, but a token-level "
                "task cannot drop words: map it to a label (e.g. other)"
            )
        target = str(value).strip()
        if names is not None and target not in names:
            raise CmmergeError(
                f"task {cfg['name']}: label_map maps {key!r} to {value!r}, which is not one of "
                f"the labels {names}"
            )
        out[str(key).strip()] = target
    return out


def infer_token_labels(cfg: dict[str, Any], root: Path) -> list[str]:
    """The sorted distinct labels (tags after ``label_map``) of the train file."""
    sentences, source = _read_sentences(cfg, "train", root, {})
    tag_map = _tag_map(cfg, None)
    labels = sorted({tag_map.get(t, t) for s in sentences for t in s.tags})
    if len(labels) == 1:
        raise CmmergeError(
            f"task {cfg['name']}: every word of {source} has the tag {labels[0]!r}; a tagger "
            "needs at least two (list them with task.labels=[...])"
        )
    if (source, tuple(labels)) not in _LOGGED:
        _LOGGED.add((source, tuple(labels)))
        log.info(
            "task %s: labels inferred from %s (sorted): %s", cfg["name"], source, ", ".join(labels)
        )
    return labels


def _fix(words: list[str]) -> list[str]:
    """ftfy over the sentence, as the sentence-level task repairs its text; word by word where
    that would change the number of words."""
    text = " ".join(words)
    if text.isascii() and text.isprintable() and "&" not in text:  # nothing ftfy would change
        return words
    whole = ftfy.fix_text(text, _FTFY_CONFIG).split(" ")
    if len(whole) == len(words) and all(w.strip() for w in whole):
        return whole
    return [ftfy.fix_text(w, _FTFY_CONFIG).strip() or w for w in words]


def _read_split(cfg: dict[str, Any], split: str, root: Path, names: list[str]) -> tuple:
    """(texts, words, label ids, raw tags, info) of one split read from its own file."""
    info: dict[str, Any] = {}
    sentences, source = _read_sentences(cfg, split, root, info)
    info["source"], info["read"] = source, len(sentences)
    tag_map = _tag_map(cfg, names)
    index = {label: i for i, label in enumerate(names)}
    unknown: dict[str, list[int]] = defaultdict(list)
    all_words, all_ids, all_tags = [], [], []
    for sentence in sentences:
        ids = []
        for tag, line in zip(sentence.tags, sentence.tag_lines, strict=True):
            label = tag_map.get(tag, tag)
            if label not in index:
                unknown[tag].append(line)
            ids.append(index.get(label, -1))
        words = list(sentence.words)
        if cfg.get("fix_mojibake"):
            words = _fix(words)
        all_words.append(words)
        all_ids.append(ids)
        all_tags.append(list(sentence.tags))
    if unknown:
        first = min(lines[0] for lines in unknown.values())
        listed = lines_listed(unknown)
        raise CmmergeError(
            f"{source} line {first}: unknown tag(s) {listed} (task {cfg['name']}, key {split}); "
            f"the task's labels are {names}: set task.labels=[...] or map tags with "
            "task.label_map"
        )
    if cfg.get("fix_mojibake"):
        info["mojibake_repaired"] = sum(
            list(s.words) != w for s, w in zip(sentences, all_words, strict=True)
        )
    info["words"] = sum(len(w) for w in all_words)
    texts = [" ".join(w) for w in all_words]
    info["sentence_labels"] = [s.label for s in sentences]  # popped by the caller
    return texts, all_words, all_ids, all_tags, info


def _to_dataset(texts: list[str], words: list, ids: list, tags: list, names: list[str]):
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "words": datasets.Sequence(datasets.Value("string")),
            "word_labels": datasets.Sequence(datasets.ClassLabel(names=names)),
            "tags": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {"text": texts, "words": words, "word_labels": ids, "tags": tags}, features=features
    )


def carve(
    ds: datasets.Dataset, size: float | int, seed: int, name: str, split: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a seeded ``size`` (a fraction, or a count when an int) of sentences off ``ds``:
    (rest, carved). Stratified by the sentence labels of a SentiMix file's headers where ``ds``
    has them (column ``stratum``): the split of the sentence-level task on the same file and
    seed, so the two tasks share their validation tweets; else not stratified."""
    stratify = "stratum" if "stratum" in ds.column_names else None
    try:
        parts = ds.train_test_split(test_size=size, seed=seed, stratify_by_column=stratify)
    except ValueError as err:
        raise CmmergeError(
            f"task {name}: cannot carve a {split} split of {size:.3g} from {len(ds)} train "
            f"sentence(s): {err}"
        ) from None
    return parts["train"], parts["test"]


def subsample_sentences(
    ds: datasets.Dataset, size: int | None, seed: int, name: str
) -> datasets.Dataset:
    """A seeded subset of ``size`` sentences (all of them when null or not smaller)."""
    if size is None or int(size) >= len(ds):
        return ds
    if int(size) < 1:
        raise CmmergeError(f"task {name}: finetune.train_size must be >= 1 or null, got {size}")
    return carve(ds, int(size), seed, name, "train_size")[1]


def word_label_counts(ds: datasets.Dataset, labels: list[str]) -> dict[str, int]:
    """Words per label (in ``labels`` order, zeros included)."""
    counts = Counter(i for ids in ds["word_labels"] for i in ids)
    return {label: int(counts.get(i, 0)) for i, label in enumerate(labels)}


def load_token_task_with_info(
    cfg: dict[str, Any], root: Path, names: list[str], seed: int
) -> tuple[datasets.DatasetDict, dict]:
    """Train / validation / test of a token-level task and what was read for each split.

    Args:
        cfg: The task config (a plain dict with ``name``).
        root: The folder its files are relative to.
        names: The label set, in id order.
        seed: Seed of the carved splits (``data.split_seed``).
    """
    name = cfg["name"]
    has = {s: bool(split_file(cfg, s)) for s in SPLITS}
    fractions = carve_fractions(cfg, has)
    carve_test, carve_val = not has["test"], not has["validation"]
    info: dict[str, dict] = {}
    out: dict[str, datasets.Dataset] = {}
    *columns, info["train"] = _read_split(cfg, "train", root, names)
    train = _to_dataset(*columns, names)
    strata = info["train"].pop("sentence_labels")
    if (carve_test or carve_val) and all(strata):
        kinds = sorted(set(strata))
        column = [kinds.index(s) for s in strata]
        train = train.add_column("stratum", column).cast_column(
            "stratum", datasets.ClassLabel(names=kinds)
        )
    if carve_test:
        train, out["test"] = carve(train, fractions["test"], seed, name, "test")
        info["test"] = {"source": "train", "carved_fraction": fractions["test"]}
    if carve_val:
        share = fractions["validation"]
        if carve_test:
            share /= 1 - fractions["test"]
        train, out["validation"] = carve(train, share, seed, name, "validation")
        info["validation"] = {"source": "train", "carved_fraction": fractions["validation"]}
    for split in ("validation", "test"):
        if split not in out:
            *columns, info[split] = _read_split(cfg, split, root, names)
            info[split].pop("sentence_labels")
            out[split] = _to_dataset(*columns, names)
    out["train"] = train.remove_columns([c for c in ("stratum",) if c in train.column_names])
    for split in ("validation", "test"):
        if "stratum" in out[split].column_names:
            out[split] = out[split].remove_columns("stratum")
    for split in SPLITS:
        info[split]["size"] = len(out[split])
        info[split]["words"] = sum(len(w) for w in out[split]["words"])
    return datasets.DatasetDict({s: out[s] for s in SPLITS}), info
