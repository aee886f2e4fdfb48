"""Copy small, seeded samples of the real code-mixed data into ``cmmerge/samples/``.

Usage::

    python scripts/make_samples.py [SRC_ROOT] [--out DIR] [--seed N]

``SRC_ROOT`` defaults to ``../shared/data`` relative to the repository root. Each sample is a
random subset of whole records (tweets) of one source file, written in the source's original
order and byte for byte (line endings, headers, mojibake and all), under the same sub-folder and
file name, so the loaders in ``cmmerge.data`` read the samples and the full data alike.
Re-running with the same seed rewrites identical files.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SRC = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "cmmerge" / "samples"
SEED = 0

# (relative path, record format, number of records to keep)
SAMPLES: list[tuple[str, str, int]] = [
    ("sentimix_hinglish/train_14k_split_conll.txt", "conll", 1500),
    ("sentimix_hinglish/dev_3k_split_conll.txt", "conll", 300),
    ("sentimix_hinglish/Hindi_test_unalbelled_conll_updated.txt", "conll", 300),
    ("sentimix_spanglish/Spanglish_train.conll", "conll", 1800),
    ("sentimix_spanglish/Spanglish_dev.conll", "conll", 300),
    ("hinglish_unlabeled/l3cube_hinglid/test.txt", "tokens", 3000),
    ("spanglish_unlabeled/borrowing_lm2013/train.conll", "tokens", 3000),
    ("hinglish_hate_bohra2018/hate_speech.tsv", "bohra", 1000),
    ("dravidian_codemix_fire2020/tamil_train.tsv", "tsv_header", 1500),
    ("dravidian_codemix_fire2020/tamil_dev.tsv", "tsv_header", 300),
    ("dravidian_codemix_fire2020/malayalam_train.tsv", "tsv_header", 1000),
    ("dravidian_codemix_fire2020/malayalam_dev.tsv", "tsv_header", 300),
]
HINGLISH_TEST = "sentimix_hinglish/Hindi_test_unalbelled_conll_updated.txt"
HINGLISH_TEST_LABELS = "sentimix_hinglish/test_labels_hinglish.txt"
LICENCE_FILES = [
    "sentimix_hinglish/LICENSE",
    "spanglish_unlabeled/borrowing_lm2013/LICENSE",
    "hinglish_hate_bohra2018/LICENSE_repo_MIT.txt",
]
BOHRA_LABELS = (b"yes", b"no")

_HEADER = re.compile(rb"^meta\t([0-9]+)(\t|\r?\n|$)")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+$")


def split_lines(data: bytes) -> list[bytes]:
    """Split bytes into lines, each keeping its own line ending."""
    return _LINE.findall(data)


def conll_records(lines: list[bytes], path: Path) -> tuple[bytes, list[bytes]]:
    """Group SentiMix CoNLL lines into tweets: a header line up to the next header."""
    records: list[bytes] = []
    prefix = b""
    for number, line in enumerate(lines, start=1):
        if _HEADER.match(line):
            records.append(line)
        elif not records:
            if line.strip():
                raise SystemExit(f"{path}:{number}: token line before any meta header")
            prefix += line
        else:
            records[-1] += line
    return prefix, records


def token_records(lines: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Group token-per-line lines into tweets: tokens plus the blank line(s) after them."""
    records: list[bytes] = []
    prefix = b""
    open_record = False
    for line in lines:
        blank = not line.strip()
        if blank and not records:
            prefix += line
        elif blank:
            records[-1] += line
            open_record = False
        elif open_record:
            records[-1] += line
        else:
            records.append(line)
            open_record = True
    return prefix, records


def bohra_records(lines: list[bytes]) -> tuple[bytes, list[bytes]]:
    """Bohra TSV rows ``text<TAB>yes|no``; a line whose last field is no label continues."""
    records: list[bytes] = []
    open_record = False
    for line in lines:
        if open_record:
            records[-1] += line
        else:
            records.append(line)
        open_record = line.rstrip(b"\r\n").rsplit(b"\t", 1)[-1] not in BOHRA_LABELS
    return b"", records


def header_records(lines: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A TSV with a header line: the header is kept, each other line is a record."""
    return lines[0], lines[1:]


def group_records(lines: list[bytes], fmt: str, src: Path) -> tuple[bytes, list[bytes]]:
    if fmt == "conll":
        return conll_records(lines, src)
    if fmt == "bohra":
        return bohra_records(lines)
    if fmt == "tsv_header":
        return header_records(lines)
    return token_records(lines)


def sample_file(src: Path, dst: Path, fmt: str, k: int, seed: int) -> list[bytes]:
    """Write a seeded sample of ``k`` records of ``src`` to ``dst``; return the kept records.

    Records that span several lines (the Bohra continuation lines) are always kept, on top of
    the ``k`` sampled ones, so the sample shows that quirk.
    """
    lines = split_lines(src.read_bytes())
    prefix, records = group_records(lines, fmt, src)
    if k > len(records):
        raise SystemExit(f"{src}: asked for {k} records, file has {len(records)}")
    keep = set(random.Random(f"{seed}:{src.name}").sample(range(len(records)), k))
    if fmt == "bohra":
        keep |= {i for i, record in enumerate(records) if record.count(b"\n") > 1}
    keep = sorted(keep)
    kept = [records[i] for i in keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(prefix + b"".join(kept))
    return kept


def sample_labels(src: Path, dst: Path, test_records: list[bytes]) -> int:
    """Write the ``Uid,Sentiment`` CSV restricted to the uids of the sampled test tweets."""
    uids = set()
    for record in test_records:
        match = _HEADER.match(record)
        assert match is not None
        uids.add(match.group(1))
    lines = split_lines(src.read_bytes())
    body = [line for line in lines[1:] if line.split(b",", 1)[0].strip() in uids]
    if len(body) != len(uids):
        raise SystemExit(f"{src}: found labels for {len(body)} of {len(uids)} sampled uids")
    dst.write_bytes(lines[0] + b"".join(body))
    return len(body)


def main(argv: list[str] | None = None) -> int:
    """Create every sample file and copy the licence files; print what was written."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src_root", nargs="?", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    src_root, out = args.src_root.resolve(), args.out.resolve()
    if not src_root.is_dir():
        print(f"error: source data folder not found: {src_root}", file=sys.stderr)
        return 2
    kept_by_file: dict[str, list[bytes]] = {}
    for rel, fmt, k in SAMPLES:
        kept_by_file[rel] = sample_file(src_root / rel, out / rel, fmt, k, args.seed)
        n = len(kept_by_file[rel])
        print(f"{rel}: {n} records, {(out / rel).stat().st_size:,} bytes")
    n = sample_labels(
        src_root / HINGLISH_TEST_LABELS, out / HINGLISH_TEST_LABELS, kept_by_file[HINGLISH_TEST]
    )
    print(f"{HINGLISH_TEST_LABELS}: {n} labels")
    for rel in LICENCE_FILES:
        shutil.copyfile(src_root / rel, out / rel)
        print(f"{rel}: copied")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total under {out}: {total:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
