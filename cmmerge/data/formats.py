"""Parsers for the raw data files: SentiMix CoNLL, ``Uid,Sentiment`` CSV, token-per-line corpora.

Word-level language tags are kept (``SentimixRecord.tags``, :func:`parse_tagged_tokens`) for the
code-mixing statistics and the English-share filter.

Every parser takes the file's path and ``what`` (a short description of where the path came from,
e.g. ``"task sentiment-en-hi, key train_file"``) and raises :class:`CmmergeError` with one line
naming the file (and line number where there is one) on bad input.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cmmerge.errors import CmmergeError

_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class SentimixRecord:
    """One tweet of a SentiMix CoNLL file.

    Attributes:
        uid: The tweet id from the header line.
        label: The header's label, or ``None`` in unlabelled files.
        text: The tweet's tokens joined with single spaces.
        line: 1-based line number of the header.
        tags: The word-level language tag of each token (``""`` where a line has none).
    """

    uid: str
    label: str | None
    text: str
    line: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaggedSentence:
    """One sentence of a word-tagged file (a token-level task's example).

    Attributes:
        words: The sentence's words, in order.
        tags: The raw tag of each word.
        line: 1-based line number where the sentence starts (its header, else its first word).
        tag_lines: The 1-based line number of each word.
        label: The sentence label of its SentiMix header, if any.
    """

    words: tuple[str, ...]
    tags: tuple[str, ...]
    line: int
    tag_lines: tuple[int, ...]
    label: str | None = None


@dataclass(frozen=True)
class TaggedText:
    """One text of a token-per-line corpus with the language tag of each token."""

    text: str
    tags: tuple[str, ...]


def resolve_path(data_root: str | Path, rel: str | Path, what: str) -> Path:
    """Return ``data_root / rel`` after checking that the root folder and the file exist.

    Args:
        data_root: The data root folder (``data.root``).
        rel: File path relative to the root (an absolute path is used as is).
        what: Where ``rel`` came from, for the error message.

    Raises:
        CmmergeError: If the root folder or the file does not exist.
    """
    root = Path(data_root).expanduser().resolve()
    if Path(rel).expanduser().is_absolute():
        path, where = Path(rel).expanduser().resolve(), what
    elif not root.is_dir():
        raise CmmergeError(f"data root folder not found: {root} (set data.root=DIR; {what})")
    else:
        path, where = (root / Path(rel).expanduser()).resolve(), f"{what}: {rel!s}; root {root}"
    if not path.is_file():
        raise CmmergeError(f"file not found: {path} ({where})")
    return path


def read_text(path: Path, what: str) -> str:
    """Read a whole file as UTF-8 (a leading BOM is dropped).

    Raises:
        CmmergeError: If the file is missing, empty (or blank) or not valid UTF-8.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CmmergeError(f"cannot read {path} ({what}): {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start : err.end].hex()
        raise CmmergeError(
            f"undecodable bytes in {path} line {line}: 0x{bad} is not UTF-8 ({what})"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise CmmergeError(f"empty file: {path} ({what})")
    return text


def split_lines(text: str) -> list[str]:
    """Split on ``\\n`` only (tweets may hold other Unicode line separators); drop ``\\r``."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def lines_listed(found: Mapping[str, list[int]]) -> str:
    """``'x' (2x, line(s) 3, 9), ...``: each value found and its first lines, for an error."""
    return ", ".join(
        f"{value!r} ({len(lines)}x, line(s) {', '.join(map(str, lines[:3]))}"
        f"{'...' if len(lines) > 3 else ''})"
        for value, lines in found.items()
    )


def _header(fields: list[str]) -> bool:
    """A header line is ``meta<TAB><digits>[<TAB>label]``; ``meta<TAB>lang2`` is a token."""
    return len(fields) >= 2 and fields[0] == "meta" and bool(_DIGITS.fullmatch(fields[1].strip()))


def parse_sentimix_conll(path: Path, what: str) -> list[SentimixRecord]:
    """Parse a SentiMix CoNLL file into tweets.

    Format: each tweet starts with ``meta<TAB>uid[<TAB>label]``, then one ``token<TAB>tag`` line
    per token; a blank line (or the next header) ends it. Empty tokens are skipped.

    Raises:
        CmmergeError: On a token line before the first header, or an unreadable file.
    """
    records: list[SentimixRecord] = []
    uid: str | None = None
    label: str | None = None
    start = 0
    tokens: list[str] = []
    tags: list[str] = []

    def close() -> None:
        if uid is not None:
            records.append(SentimixRecord(uid, label, " ".join(tokens), start, tuple(tags)))

    for number, line in enumerate(split_lines(read_text(path, what)), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if _header(fields):
            close()
            uid, start, tokens, tags = fields[1].strip(), number, [], []
            label = fields[2].strip() if len(fields) > 2 and fields[2].strip() else None
        elif uid is None:
            raise CmmergeError(
                f"{path} line {number}: token line before any 'meta<TAB>uid' header ({what})"
            )
        elif fields[0].strip():
            tokens.append(fields[0].strip())
            tags.append(fields[1].strip() if len(fields) > 1 else "")
    close()
    if not records:
        raise CmmergeError(
            f"no 'meta<TAB>uid' header in {path}: not a SentiMix CoNLL file ({what})"
        )
    return records


def parse_tagged_sentences(path: Path, what: str, headers: bool) -> list[TaggedSentence]:
    """Parse a word-tagged file strictly: one ``word<TAB>tag`` line per word, a blank line
    between sentences; further tab-separated fields are ignored.

    Args:
        path: The file.
        what: Where the path came from, for error messages.
        headers: SentiMix CoNLL (``meta<TAB>uid[<TAB>label]`` lines start sentences, and are
            not words); without, every non-blank line is a word.

    Returns:
        The sentences in file order; a header with no word after it gives no sentence.

    Raises:
        CmmergeError: Naming the file and line of the first word with no tag, or when the file
            holds no tagged word at all. A line whose word is blank is skipped.
    """
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []
    header = 0  # line of the header the next sentence belongs to (0: none)
    label: str | None = None  # that header's sentence label

    def close() -> None:
        if words:
            start = header or lines[0]
            sentences.append(
                TaggedSentence(
                    tuple(words), tuple(tags), start, tuple(lines), label if header else None
                )
            )
        words.clear()
        tags.clear()
        lines.clear()

    for number, line in enumerate(split_lines(read_text(path, what)), start=1):
        if not line.strip():
            if words:
                close()
                header = 0
            continue
        fields = line.split("\t")
        if headers and _header(fields):
            close()
            header = number
            label = fields[2].strip() or None if len(fields) > 2 else None
            continue
        word = fields[0].strip()
        if not word:  # a blank word (SentiMix has a few ' <TAB>O' lines): skipped
            continue
        tag = fields[1].strip() if len(fields) > 1 else ""
        if not tag:
            raise CmmergeError(
                f"{path} line {number}: word {word!r} has no tag: expected word<TAB>tag ({what})"
            )
        words.append(word)
        tags.append(tag)
        lines.append(number)
    close()
    if not sentences:
        raise CmmergeError(f"no word<TAB>tag line in {path} ({what})")
    return sentences


def parse_tagged_tokens(path: Path, what: str) -> list[TaggedText]:
    """Parse a ``token<TAB>tag`` a line corpus; blank lines separate tweets.

    Returns:
        One :class:`TaggedText` per tweet, tokens joined with single spaces.
    """
    texts: list[TaggedText] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in split_lines(read_text(path, what)):
        fields = line.split("\t")
        token = fields[0].strip()
        if line.strip():
            if token:
                tokens.append(token)
                tags.append(fields[1].strip() if len(fields) > 1 else "")
        elif tokens:
            texts.append(TaggedText(" ".join(tokens), tuple(tags)))
            tokens, tags = [], []
    if tokens:
        texts.append(TaggedText(" ".join(tokens), tuple(tags)))
    return texts


def parse_text_lines(path: Path, what: str) -> list[str]:
    """Parse a plain-text corpus: one text a line, blank lines skipped."""
    return [line.strip() for line in split_lines(read_text(path, what)) if line.strip()]


def read_labels_csv(path: Path, what: str) -> dict[str, str]:
    """Read a ``Uid,Sentiment`` CSV (header required, names matched case-insensitively).

    Returns:
        Mapping from uid to label string.

    Raises:
        CmmergeError: On a missing column, a short row or a uid given two different labels.
    """
    rows = csv.reader(io.StringIO(read_text(path, what), newline=""))
    header = [name.strip().lower() for name in next(rows)]
    if "uid" not in header or "sentiment" not in header:
        raise CmmergeError(f"{path} line 1: expected a 'Uid,Sentiment' header ({what})")
    uid_col, label_col = header.index("uid"), header.index("sentiment")
    labels: dict[str, str] = {}
    for number, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(uid_col, label_col):
            raise CmmergeError(f"{path} line {number}: expected 'Uid,Sentiment' ({what})")
        uid, label = row[uid_col].strip(), row[label_col].strip()
        if labels.setdefault(uid, label) != label:
            raise CmmergeError(f"{path} line {number}: uid {uid} has two labels ({what})")
    return labels
