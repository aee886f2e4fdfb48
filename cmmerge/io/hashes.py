"""Content hashes of weights for model cards: SHA-256, remembered by path, size and mtime.

Hashing a 2.4 GB checkpoint takes seconds, and a sweep merges the same sources dozens of
times, so each file's digest can be kept in ``<cache>/sha256.json`` (cmmerge's cache folder)
with the file's size and modification time, and is recomputed only when either changes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

from cmmerge.io.manifest import file_sha256, read_json, write_json_atomic
from cmmerge.io.model_files import WEIGHT_SUFFIXES

_CACHE_NAME = "sha256.json"
_SEEN: dict[tuple[str, int, int], str] = {}  # this process's digests, by path, size and mtime


def _read_cache(cache_file: Path) -> dict:
    """The cache's entries ({} when it is missing or unreadable: it is then started again)."""
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def file_digests(paths: Sequence[Path], cache: Path | None = None) -> list[str]:
    """Hex SHA-256 of each of ``paths``; with a ``cache`` folder, remembered there while each
    file's size and modification time stay the same.

    The cache is read once. Files not in it are hashed without holding anything; their entries
    are then added under the cache's lock (``sha256.json.lock``) to the cache as it is by then,
    written to a temp file and renamed into place, so processes hashing at the same time (a
    parallel sweep) keep each other's entries and a reader never sees half a file."""
    paths = [Path(p).resolve() for p in paths]
    if cache is None:
        return [file_sha256(p) for p in paths]
    cache_file = Path(cache) / _CACHE_NAME
    known = _read_cache(cache_file)
    out: list[str] = []
    new: dict[str, list] = {}
    for path in paths:
        stat = path.stat()
        key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
        seen = _SEEN.get((key, *stamp))
        if seen is not None:
            out.append(seen)
            continue
        hit = known.get(key) or new.get(key)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
            out.append(str(hit[2]))
            _SEEN[(key, *stamp)] = str(hit[2])
            continue
        digest = file_sha256(path)
        new[key] = [*stamp, digest]
        _SEEN[(key, *stamp)] = digest
        out.append(digest)
    if new:
        try:
            with FileLock(str(cache_file) + ".lock"):
                write_json_atomic(cache_file, {**_read_cache(cache_file), **new})
        except OSError:  # a read-only cache folder: the digests are still right
            pass
    return out


def file_digest(path: Path, cache: Path | None = None) -> str:
    """Hex SHA-256 of ``path``, cached as :func:`file_digests` says."""
    return file_digests([path], cache)[0]


def weights_digest(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of a model's weights: of the file itself, of a folder's single weight file, or
    of the ``name digest`` lines of a sharded folder's weight files (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, cache)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    digests = file_digests(files, cache)
    if len(files) == 1:
        return digests[0]
    lines = "".join(f"{f.name} {d}\n" for f, d in zip(files, digests, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def describe(path: Path, cache: Path | None = None) -> dict[str, str]:
    """``{"path": ..., "sha256": ...}`` for a model card or merge record."""
    return {"path": os.fspath(path), "sha256": weights_digest(Path(path), cache)}


def default_cache() -> Path:
    """cmmerge's cache folder when no config is at hand: $CMMERGE_CACHE or ~/.cache/cmmerge."""
    return Path(os.environ.get("CMMERGE_CACHE") or Path.home() / ".cache" / "cmmerge").expanduser()


def content_digest(path: Path, cache: Path | None = None) -> str:
    """SHA-256 identity of a file's or a folder's contents (every non-hidden file, by relative
    name and digest), so a file rewritten in place at the same size is a new input."""
    path = Path(path)
    cache = default_cache() if cache is None else cache
    cache.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        return file_digest(path, cache)
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    digests = file_digests(files, cache)
    lines = "".join(
        f"{f.relative_to(path).as_posix()} {d}\n" for f, d in zip(files, digests, strict=True)
    )
    return hashlib.sha256(lines.encode()).hexdigest()
