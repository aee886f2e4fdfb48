"""Tabular task files: CSV, TSV (no quoting, as the research TSVs are written) and JSON lines;
the names and detection of every task file format (token-level tasks' too).

:func:`read_table` returns the rows of one file as :class:`Row` (text, raw label, line number) for
the configured text and label columns; errors name the file and line, and a missing column lists
the columns that were found.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cmmerge.data.formats import read_text, split_lines
from cmmerge.errors import CmmergeError

TABLE_FORMATS = ("csv", "tsv", "jsonl")
FILE_FORMATS = ("sentimix_conll", *TABLE_FORMATS)
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".conll": "sentimix_conll",
}
_CONLL_HEADER = re.compile(r"meta\t[0-9]+(\t|$)")


@dataclass(frozen=True)
class Row:
    """One labelled row: the text, the raw label (``None`` when the cell is empty) and its line."""

    text: str
    label: str | None
    line: int


def canonical_format(fmt: str | None) -> str:
    """``conll`` is an alias of ``sentimix_conll``; ``None`` means ``auto``."""
    fmt = (fmt or "auto").lower()
    return "sentimix_conll" if fmt == "conll" else fmt


TOKEN_FORMATS = ("sentimix_conll", "conll_tokens")


def canonical_token_format(fmt: str | None) -> str:
    """The format of a token-level task's files: ``sentimix_conll`` (``meta<TAB>uid`` header
    lines start sentences), ``conll_tokens`` (alias ``token_per_line``: ``word<TAB>tag`` lines,
    a blank line between sentences, no headers), or ``auto`` (alias ``conll``: by the first
    line)."""
    fmt = (fmt or "auto").lower()
    return {"conll": "auto", "token_per_line": "conll_tokens"}.get(fmt, fmt)


def detect_token_format(path: Path, what: str) -> str:
    """``sentimix_conll`` when the first non-blank line of ``path`` is a SentiMix header, else
    ``conll_tokens``."""
    first = next((line for line in split_lines(read_text(path, what)) if line.strip()), "")
    return "sentimix_conll" if _CONLL_HEADER.match(first) else "conll_tokens"


def detect_format(path: Path, what: str) -> str:
    """The format of ``path`` from its suffix, else from its first non-blank line."""
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    if by_suffix:
        return by_suffix
    first = next((line for line in split_lines(read_text(path, what)) if line.strip()), "")
    if _CONLL_HEADER.match(first):
        return "sentimix_conll"
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first else "csv"


def _delimited(path: Path, fmt: str, what: str) -> list[tuple[int, list[str]]]:
    """The non-blank rows ``(line, cells)`` of a CSV (quoted) or TSV (unquoted) file."""
    text = read_text(path, what)
    if fmt == "tsv":
        numbered = [(n, line.split("\t")) for n, line in enumerate(split_lines(text), start=1)]
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        numbered, line = [], 1
        try:
            for cells in reader:
                numbered.append((line, cells))
                line = reader.line_num + 1
        except csv.Error as err:
            raise CmmergeError(f"{path} line {reader.line_num}: bad CSV: {err} ({what})") from None
    return [(n, cells) for n, cells in numbered if any(c.strip() for c in cells)]


def _jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(split_lines(read_text(path, what)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CmmergeError(f"{path} line {number}: not JSON: {err.msg} ({what})") from None
        if not isinstance(obj, dict):
            raise CmmergeError(f"{path} line {number}: expected a JSON object a line ({what})")
        rows.append((number, obj))
    return rows


def _cell(value: object) -> str | None:
    if value is None:
        return None
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )
    return text.strip() or None


def _missing_column(path: Path, column: str, role: str, found: Sequence[str], what: str):
    return CmmergeError(
        f"{path}: no {role} column {column!r}; columns found: {', '.join(map(str, found))} "
        f"(set task.{role}_column; {what})"
    )


def _jsonl_rows(
    path: Path, what: str, text_column: str | int, label_column: str | int | None
) -> list[Row]:
    """The rows of a JSON lines file; every configured column must be a key of some object."""
    rows = _jsonl(path, what)
    found = list(dict.fromkeys(k for _, obj in rows for k in obj))
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column is not None and str(column) not in found:
            raise _missing_column(path, str(column), role, found, what)
    return [
        Row(
            _cell(obj.get(str(text_column))) or "",
            None if label_column is None else _cell(obj.get(str(label_column))),
            n,
        )
        for n, obj in rows
    ]


def _header_index(
    path: Path,
    numbered: list[tuple[int, list[str]]],
    text_column: str | int,
    label_column: str | int | None,
    header: bool,
    what: str,
) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """The cell index of the text (and label) column, and the data rows after any header."""
    if not header:
        index = {"text": int(text_column)}
        if label_column is not None:
            index["label"] = int(label_column)
        return index, numbered
    names = [c.strip().removeprefix("\ufeff") for c in numbered[0][1]]
    index = {}
    for column, role in ((text_column, "text"), (label_column, "label")):
        if column is None:
            continue
        if str(column) not in names:
            raise _missing_column(path, str(column), role, names, what)
        index[role] = names.index(str(column))
    return index, numbered[1:]


def read_table(
    path: Path,
    fmt: str,
    what: str,
    text_column: str | int,
    label_column: str | int | None,
    header: bool = True,
) -> list[Row]:
    """Read the text (and label) column of a CSV, TSV or JSONL file.

    Args:
        path: The file.
        fmt: ``csv``, ``tsv`` or ``jsonl``.
        what: Where the path came from, for error messages.
        text_column: Column name (or 0-based index when ``header`` is false).
        label_column: Label column name or index; ``None`` reads texts only (labels ``None``).
        header: Whether the first non-blank line of a CSV/TSV names the columns.

    Raises:
        CmmergeError: On a missing column (the columns found are listed), a short row, bad JSON.
    """
    if fmt == "jsonl":
        return _jsonl_rows(path, what, text_column, label_column)
    if fmt not in ("csv", "tsv"):
        raise CmmergeError(f"{path}: unknown table format {fmt!r} (known: {TABLE_FORMATS})")
    numbered = _delimited(path, fmt, what)
    if not numbered:
        raise CmmergeError(f"empty file: {path} ({what})")
    index, numbered = _header_index(path, numbered, text_column, label_column, header, what)
    need = max(index.values()) + 1
    out = []
    for number, cells in numbered:
        if len(cells) < need:
            raise CmmergeError(
                f"{path} line {number}: {len(cells)} field(s), expected at least "
                f"{need} ({fmt}; {what})"
            )
        label = _cell(cells[index["label"]]) if "label" in index else None
        out.append(Row(cells[index["text"]].strip(), label, number))
    return out
