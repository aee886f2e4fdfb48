"""Content hashes of weights for model cards: SHA-256, remembered by path, size and mtime.

Hashing a 2.4 GB checkpoint takes seconds, and a sweep merges the same sources dozens of
times, so each file's digest can be kept in ``<cache>/sha256.json`` (cmmerge's cache folder)
with the file's size and modification time, and is recomputed only when either changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cmmerge.io.manifest import file_sha256, read_json, write_json_atomic
from cmmerge.io.model_card import WEIGHT_SUFFIXES

_CACHE_NAME = "sha256.json"
_SEEN: dict[tuple[str, int, int], str] = {}  # this process's digests, by path, size and mtime


def file_digest(path: Path, cache: Path | None = None) -> str:
    """Hex SHA-256 of ``path``; with a ``cache`` folder, remembered there while the file's size
    and modification time stay the same."""
    path = Path(path).resolve()
    if cache is None:
        return file_sha256(path)
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    seen = _SEEN.get((key, *stamp))
    if seen is not None:
        return seen
    digest = _cached_digest(path, key, stamp, Path(cache))
    _SEEN[(key, *stamp)] = digest
    return digest


def _cached_digest(path: Path, key: str, stamp: list[int], cache: Path) -> str:
    """The digest of ``path`` from the cache file in ``cache``, computed and added there when
    its size and time are not the ones recorded."""
    cache_file = Path(cache) / _CACHE_NAME
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except (OSError, ValueError):  # unreadable cache: start a new one
        cache = {}
    hit = cache.get(key)
    if isinstance(hit, list) and hit[:2] == stamp and len(hit) == 3:
        return str(hit[2])
    digest = file_sha256(path)
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}  # others may have added
    except (OSError, ValueError):
        cache = {}
    cache[key] = [*stamp, digest]
    try:
        write_json_atomic(cache_file, cache)
    except OSError:  # a read-only cache folder: the digest is still right
        pass
    return digest


def weights_digest(path: Path, cache: Path | None = None) -> str:
    """SHA-256 of a model's weights: of the file itself, of a folder's single weight file, or
    of the ``name digest`` lines of a sharded folder's weight files (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return file_digest(path, cache)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if len(files) == 1:
        return file_digest(files[0], cache)
    lines = "".join(f"{f.name} {file_digest(f, cache)}\n" for f in files)
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
    lines = "".join(f"{f.relative_to(path).as_posix()} {file_digest(f, cache)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
