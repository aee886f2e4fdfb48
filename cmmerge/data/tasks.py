"""Labelled task data: ``load_task`` builds train / validation / test splits from a task config.

Task config keys (``configs/task/<name>.yaml``; file paths relative to ``root``, default
``data.root``):

- ``name``, ``labels`` (ordered; label id = index; ``null``: the sorted distinct labels of the
  train file, after ``label_map``), ``format``: ``sentimix_conll`` (alias
  ``conll``), ``tsv``, ``csv``, ``jsonl`` or ``auto`` (by suffix, else by the first line).
- ``train``, ``validation``, ``test``: files (``train_file`` etc. are accepted too);
  ``test_labels``: a ``Uid,Sentiment`` CSV joined by uid to an unlabelled CoNLL test file.
- ``validation_fraction`` / ``test_fraction``: a split without a file is carved out of train,
  seeded and stratified (fractions of the whole file; test first).
- ``text_column``, ``label_column``, ``header`` (CSV/TSV; without a header, columns are 0-based
  indices), ``label_map`` (raw label -> label, ``null`` drops the row; raw labels are trimmed and
  labels already in ``labels`` pass through), ``join_continuation_lines`` (a row whose label is
  not a known raw label is the first line of a text broken over lines: joined with the next).
- ``fix_mojibake`` (ftfy), ``language_tags`` (word tag -> language) with ``filter_language`` and
  ``filter_min_share`` (keep tweets whose language-tagged tokens are at least that share of it).
- ``hub``, ``hub_config``, ``hub_splits`` ({split: hub split}): read the splits from the hub.
- ``type``: ``sequence`` (the default: one label per text) or ``token`` (one label per word,
  e.g. language identification; see :mod:`cmmerge.data.token_tasks`).

Rows whose text is blank are dropped (counted as ``blank_dropped`` in the split's info); a split
left with no text is an error.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import datasets
import ftfy

from cmmerge.data.formats import (
    lines_listed,
    parse_sentimix_conll,
    read_labels_csv,
    resolve_path,
)
from cmmerge.data.hub import hub_rows
from cmmerge.data.splits import SPLITS, carve_fractions, config_root, split_file
from cmmerge.data.tables import FILE_FORMATS, Row, canonical_format, detect_format, read_table
from cmmerge.data.token_tasks import (
    infer_token_labels,
    is_token_task,
    load_token_task_with_info,
    word_label_counts,
)
from cmmerge.errors import CmmergeError
from cmmerge.presets import SAMPLES_DIR, plain

log = logging.getLogger("cmmerge")

_LOGGED: set[tuple[str, tuple[str, ...]]] = set()  # label sets inferred and logged so far
# Repair mojibake but leave clean text alone (the default config would also uncurl quotes).
_FTFY_CONFIG = ftfy.TextFixerConfig(uncurl_quotes=False)
Tags = tuple[str, ...]


def samples_root() -> Path:
    """Return the folder of the data samples shipped inside the package (the default data root)."""
    return SAMPLES_DIR


def as_dict(cfg: Mapping) -> dict[str, Any]:
    """Return a plain ``dict`` copy of a task's settings (a config node is resolved first)."""
    return dict(plain(cfg))


def labels_given(task_cfg: Mapping) -> bool:
    """Whether the task config lists its labels (else they are inferred from the train file)."""
    return as_dict(task_cfg).get("labels") is not None


def task_labels(task_cfg: Mapping) -> list[str]:
    """Return the task's ordered label list, checking it is a non-empty list of unique names."""
    cfg = as_dict(task_cfg)
    labels = cfg.get("labels")
    name = cfg.get("name", "?")
    if not isinstance(labels, list) or not labels:
        raise CmmergeError(f"task {name}: 'labels' must be a non-empty list of label names")
    labels = [str(label) for label in labels]
    if len(set(labels)) != len(labels):
        raise CmmergeError(f"task {name}: 'labels' has duplicates: {labels}")
    return labels


def _label_map(cfg: dict[str, Any], names: list[str] | None) -> dict[str, str | None]:
    """The trimmed raw-label map, checked against ``names`` (unless None)."""
    raw = cfg.get("label_map") or {}
    if not isinstance(raw, Mapping):
        raise CmmergeError(f"task {cfg['name']}: label_map must be a mapping, got {raw!r}")
    out: dict[str, str | None] = {}
    for key, value in raw.items():
        target = None if value is None else str(value).strip()
        if target is not None and names is not None and target not in names:
            raise CmmergeError(
                f"task {cfg['name']}: label_map maps {key!r} to {value!r}, which "
                f"is not one of the labels {names}"
            )
        out[str(key).strip()] = target
    return out


def _read_rows(cfg: dict[str, Any], split: str, root: Path, info: dict) -> tuple[list, str]:
    """Rows ``(Row, tags)`` of one split from its file (or hub split) and where they came from."""
    name = cfg["name"]
    what = f"task {name}, key {split}"
    if cfg.get("hub"):
        hub_split = cfg["hub_splits"][split]
        rows = hub_rows(
            str(cfg["hub"]),
            cfg.get("hub_config"),
            hub_split,
            str(cfg.get("text_column") or "text"),
            str(cfg.get("label_column") or "label"),
            what,
        )
        return [(row, ()) for row in rows], f"hub:{cfg['hub']}[{hub_split}]"
    path = resolve_path(root, split_file(cfg, split), what)  # type: ignore[arg-type]
    fmt = canonical_format(cfg.get("format"))
    if fmt == "auto":
        fmt = detect_format(path, what)
    if fmt not in FILE_FORMATS:
        raise CmmergeError(
            f"task {name}: unknown format {fmt!r} (known: auto, conll, {', '.join(FILE_FORMATS)})"
        )
    info["format"] = fmt
    if fmt != "sentimix_conll":
        header = bool(cfg.get("header", True))
        text_col = cfg.get("text_column", "text" if header else 0)
        label_col = cfg.get("label_column", "label" if header else 1)
        rows = read_table(path, fmt, what, text_col, label_col, header)
        return [(row, ()) for row in rows], str(path)
    records = parse_sentimix_conll(path, what)
    label_of = {r.uid: r.label for r in records}
    labels_rel = split_file(cfg, "test_labels") if split == "test" else None
    if labels_rel:
        where = f"task {name}, key test_labels"
        csv_path = resolve_path(root, labels_rel, where)
        csv_labels = read_labels_csv(csv_path, where)
        missing = [r.uid for r in records if r.uid not in csv_labels]
        if missing:
            raise CmmergeError(
                f"{csv_path}: no label for {len(missing)} uid(s) of {path}, "
                f"e.g. {missing[:5]} ({where})"
            )
        label_of = {r.uid: csv_labels[r.uid] for r in records}
    unlabelled = [r for r in records if label_of[r.uid] is None]
    if unlabelled:
        r = unlabelled[0]
        raise CmmergeError(
            f"{path} line {r.line}: tweet {r.uid} has no label and the config "
            f"gives no labels file ({len(unlabelled)} unlabelled; {what})"
        )
    return [(Row(r.text, label_of[r.uid], r.line), r.tags) for r in records], str(path)


def _join_continuations(rows: list, known: set[str], info: dict) -> list:
    """Join a row whose label is not a known raw label with the row after it."""
    out, pending = [], None
    for row, tags in rows:
        if pending is not None:
            row = Row(
                f"{pending.text} {pending.label or ''} {row.text}".strip(), row.label, pending.line
            )
            pending = None
        if row.label not in known:
            pending = row
            info["continuation_lines_joined"] = info.get("continuation_lines_joined", 0) + 1
            continue
        out.append((row, tags))
    if pending is not None:  # a last line without a label stays, and is reported as unknown
        info["continuation_lines_joined"] -= 1
        out.append((pending, ()))
    return out


def _english_share(tags: Tags, lang_of: Mapping[str, str], language: str) -> float | None:
    langs = [lang_of[t] for t in tags if t in lang_of]
    return None if not langs else langs.count(language) / len(langs)


def _sort_rows(
    rows: list,
    label_map: Mapping[str, str | None],
    names: list[str],
    source: str,
    name: str,
    split: str,
) -> tuple[list, dict[str, list[int]], Counter[str], int]:
    """Sort rows into kept (text, label id, tags), unknown labels, dropped labels and blanks."""
    unknown: dict[str, list[int]] = defaultdict(list)
    dropped: Counter[str] = Counter()
    kept, blank = [], 0
    for row, tags in rows:
        if row.label is None:
            raise CmmergeError(f"{source} line {row.line}: empty label (task {name}, key {split})")
        label = label_map[row.label] if row.label in label_map else row.label
        if label is None:
            dropped[row.label] += 1
        elif label not in names:
            unknown[row.label].append(row.line)
        elif not row.text.strip():
            blank += 1
        else:
            kept.append((row.text, names.index(label), tags))
    return kept, unknown, dropped, blank


def _raise_unknown(
    unknown: dict[str, list[int]], names: list[str], source: str, name: str, split: str
) -> NoReturn:
    """Refuse the labels that are neither task labels nor mapped, with their first lines."""
    raise CmmergeError(
        f"unknown label(s) {lines_listed(unknown)} in {source} (task {name}, key "
        f"{split}); the task's labels are {names}: set task.labels=[...] or "
        f"map raw labels with task.label_map"
    )


def _filter_language(cfg: dict[str, Any], kept: list, source: str, info: dict) -> list:
    """Keep the rows whose language-tagged words are at least ``filter_min_share`` of it."""
    lang_of, language = cfg.get("language_tags") or {}, str(cfg["filter_language"])
    share = float(cfg.get("filter_min_share", 0.9))
    if not any(tags for *_, tags in kept):
        raise CmmergeError(
            f"task {cfg['name']}: filter_language needs word-level language "
            f"tags (format sentimix_conll), {source} has none"
        )
    before = len(kept)
    kept = [k for k in kept if (_english_share(k[2], lang_of, language) or 0.0) >= share]
    info["filtered_out"] = before - len(kept)
    return kept


def _read_split(cfg: dict[str, Any], split: str, root: Path, names: list[str]) -> tuple:
    """(texts, label ids, tags, info) of one split read from its own file."""
    info: dict[str, Any] = {}
    rows, source = _read_rows(cfg, split, root, info)
    info["source"], info["read"] = source, len(rows)
    label_map = _label_map(cfg, names)
    if cfg.get("join_continuation_lines"):
        rows = _join_continuations(rows, set(label_map) | set(names), info)
    kept, unknown, dropped, blank = _sort_rows(rows, label_map, names, source, cfg["name"], split)
    if blank:
        info["blank_dropped"] = blank
        log.warning("task %s, %s: %d row(s) with blank text dropped", cfg["name"], split, blank)
    if unknown:
        _raise_unknown(unknown, names, source, cfg["name"], split)
    if dropped:
        info["dropped_by_label_map"] = dict(sorted(dropped.items()))
    if cfg.get("filter_language") and not cfg.get("hub"):  # hub sets have no word tags
        kept = _filter_language(cfg, kept, source, info)
    texts = [text for text, _, _ in kept]
    if cfg.get("fix_mojibake"):
        fixed = [ftfy.fix_text(t, _FTFY_CONFIG) for t in texts]
        info["mojibake_repaired"] = sum(a != b for a, b in zip(texts, fixed, strict=True))
        texts = fixed
    if not texts:
        why = f" ({blank} row(s) with blank text dropped)" if blank else ""
        raise CmmergeError(
            f"task {cfg['name']}: split {split} ({source}) has no examples left{why}"
        )
    return texts, [label for _, label, _ in kept], [list(t) for *_, t in kept], info


def _to_dataset(texts: list[str], labels: list[int], tags: list, names: list[str]):
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
            "tags": datasets.Sequence(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {"text": texts, "label": labels, "tags": tags}, features=features
    )


def _carve(
    ds: datasets.Dataset, fraction: float, seed: int, name: str, split: str, names: list[str]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split a stratified, seeded ``fraction`` (or count, an int) off ``ds``: (rest, carved)."""
    try:
        parts = ds.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as err:
        counts = {names[i]: n for i, n in sorted(Counter(ds["label"]).items())}
        raise CmmergeError(
            f"task {name}: cannot carve a stratified {split} split of "
            f"{fraction:.3g} from train (label counts {counts}): {err}"
        ) from None
    return parts["train"], parts["test"]


def subsample(ds: datasets.Dataset, size: int | None, seed: int, name: str) -> datasets.Dataset:
    """A seeded, stratified subset of ``size`` examples of ``ds`` (all of it when ``size`` is
    null or not smaller): the training budget of a CPU-sized study."""
    if size is None or int(size) >= len(ds):
        return ds
    if int(size) < 1:
        raise CmmergeError(f"task {name}: finetune.train_size must be >= 1 or null, got {size}")
    _, kept = _carve(ds, int(size), seed, name, "train_size", ds.features["label"].names)
    return kept


def _root(cfg: dict[str, Any], data_root: str | Path) -> Path:
    """The folder the task's files are relative to; a task without a train file is refused."""
    if not cfg.get("hub") and not split_file(cfg, "train"):
        raise CmmergeError(
            f"task {cfg['name']}: no train file (set task.train=PATH or task.hub=NAME)"
        )
    return config_root(cfg, data_root)


def infer_labels(task_cfg: Mapping, data_root: str | Path) -> list[str]:
    """The sorted distinct labels of the train split (after ``label_map``): the label set of a
    task whose config has ``labels: null``. ``[]`` when no row is left (reading the split then
    says why)."""
    cfg = as_dict(task_cfg)
    cfg["name"] = name = cfg.get("name") or "?"
    if is_token_task(cfg):
        return infer_token_labels(cfg, _root(cfg, data_root))
    if cfg.get("join_continuation_lines"):
        raise CmmergeError(f"task {name}: join_continuation_lines needs task.labels=[...]")
    rows, source = _read_rows(cfg, "train", _root(cfg, data_root), {})
    label_map = _label_map(cfg, None)
    found: set[str] = set()
    for row, _ in rows:
        if row.label is None:
            raise CmmergeError(f"{source} line {row.line}: empty label (task {name}, key train)")
        label = label_map[row.label] if row.label in label_map else row.label
        if label is not None:
            found.add(label)
    labels = sorted(found)
    if len(labels) == 1:
        raise CmmergeError(
            f"task {name}: every row of {source} has the label {labels[0]!r}; a classifier "
            "needs at least two (list them with task.labels=[...])"
        )
    if (source, tuple(labels)) not in _LOGGED:  # once per file and label set, not per read
        _LOGGED.add((source, tuple(labels)))
        log.info("task %s: labels inferred from %s (sorted): %s", name, source, ", ".join(labels))
    return labels


def resolve_labels(task_cfg: Mapping, data_root: str | Path) -> list[str]:
    """``task.labels`` when given, else the labels :func:`infer_labels` finds."""
    if labels_given(task_cfg):
        return task_labels(task_cfg)
    return infer_labels(task_cfg, data_root)


def load_task_with_info(
    task_cfg: Mapping, data_root: str | Path, seed: int = 0
) -> tuple[datasets.DatasetDict, dict]:
    """Like :func:`load_task`, keeping a ``tags`` column, plus what happened to each split.

    Returns:
        ``(splits, info)``: info is ``{split: {source, read, dropped_by_label_map, ...}}``.
    """
    cfg = as_dict(task_cfg)
    name = cfg.get("name") or "?"
    cfg["name"] = name
    token = is_token_task(cfg)  # an unknown task.type is named before anything is read
    root = _root(cfg, data_root)
    if labels_given(cfg):
        names = task_labels(cfg)
    if cfg.get("hub") and not token:
        cfg["hub_splits"] = cfg.get("hub_splits") or {s: s for s in SPLITS}
        has = {s: bool(cfg["hub_splits"].get(s)) for s in SPLITS}
    else:
        has = {s: bool(split_file(cfg, s)) for s in SPLITS}
    fractions = carve_fractions(cfg, has)
    carve_test = not has["test"]
    carve_val = not has["validation"]
    if not labels_given(cfg):
        names = infer_labels(cfg, data_root)
    if token:  # one label per word: cmmerge.data.token_tasks
        return load_token_task_with_info(cfg, root, names, seed)
    info: dict[str, dict] = {}
    out: dict[str, datasets.Dataset] = {}
    texts, labels, tags, info["train"] = _read_split(cfg, "train", root, names)
    train = _to_dataset(texts, labels, tags, names)
    info["train"]["labelled"] = len(train)
    if carve_test:
        train, out["test"] = _carve(train, fractions["test"], seed, name, "test", names)
        info["test"] = {"source": "train", "carved_fraction": fractions["test"]}
    if carve_val:
        share = (
            fractions["validation"] / (1 - fractions["test"])
            if carve_test
            else fractions["validation"]
        )
        train, out["validation"] = _carve(train, share, seed, name, "validation", names)
        info["validation"] = {"source": "train", "carved_fraction": fractions["validation"]}
    for split in ("validation", "test"):
        if split not in out:
            texts, labels, tags, info[split] = _read_split(cfg, split, root, names)
            out[split] = _to_dataset(texts, labels, tags, names)
    out["train"] = train
    for split in SPLITS:
        info[split]["size"] = len(out[split])
    return datasets.DatasetDict({s: out[s] for s in SPLITS}), info


def load_task(task_cfg: Mapping, data_root: str | Path, seed: int = 0) -> datasets.DatasetDict:
    """Load a labelled task as splits ``train``, ``validation`` and ``test``.

    Args:
        task_cfg: The task config (``cfg.task``).
        data_root: Folder the config's file paths are relative to (``data.root``), unless the
            config has its own ``root``.
        seed: Seed of the stratified carve-outs (``validation_fraction``, ``test_fraction``); the
            same seed always gives the same split. Pass a constant (``data.split_seed``), not the
            training seed, to keep one validation set across training seeds.

    Returns:
        A ``DatasetDict`` whose splits have the columns ``text`` (str) and ``label`` (int, a
        ``ClassLabel`` over ``task_cfg['labels']``).

    Raises:
        CmmergeError: On a bad config, a missing, empty or undecodable file, a missing column or
            unknown labels.
    """
    splits, _ = load_task_with_info(task_cfg, data_root, seed)
    return splits.remove_columns("tags")


def dataset_labels(ds: datasets.Dataset) -> list[str]:
    """The label names of a loaded split (a token-level task's word labels too)."""
    if "word_labels" in ds.column_names:
        return list(ds.features["word_labels"].feature.names)
    return list(ds.features["label"].names)


def label_counts(ds: datasets.Dataset, labels: list[str]) -> dict[str, int]:
    """Count the examples of each label (in ``labels`` order, zeros included); words, for a
    token-level task."""
    if "word_labels" in ds.column_names:
        return word_label_counts(ds, list(labels))
    counts = dict.fromkeys(labels, 0)
    for label_id in ds["label"]:
        counts[labels[label_id]] += 1
    return counts


def label_distribution(ds: datasets.DatasetDict, labels: list[str]) -> dict:
    """Return ``{split: {label: count}}`` for every split of ``ds``."""
    return {name: label_counts(split, list(labels)) for name, split in ds.items()}
