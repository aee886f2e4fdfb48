"""Content hashes of weights for model cards: SHA-256, remembered by path, size and mtime.

Hashing a 2.4 GB checkpoint takes seconds, and a sweep merges the same sources dozens of
times, so each file's digest can be kept in ``<cache>/sha256.json`` (cmmerge's cache folder)
with the file's size and modification time, and is recomputed only when either changes.

Stage manifests record their outputs' contents as *block digests* (:func:`block_digests`): the
XXH3-128 of the XXH3-128 digests of the file's 64 MiB blocks, marked by :data:`BLOCKS` (about
15 GB/s a core, where SHA-256 hashes 1.1 GB/s: the merge's 1.1 GB output took 0.37 s of its
2.9 s). They say whether a file changed, not who made it, so a non-cryptographic hash is
enough; manifests written before this record SHA-256 block digests (:data:`SHA256_BLOCKS`) and
are checked with those. The blocks hash on every core.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash
from filelock import FileLock

from cmmerge.dist import usable_cpus
from cmmerge.io.manifest import file_sha256, read_json, write_json_atomic
from cmmerge.io.model_files import WEIGHT_SUFFIXES

_CACHE_NAME = "sha256.json"
_SEEN: dict[tuple[str, int, int], str] = {}  # this process's digests, by path, size and mtime
BLOCKS = "xxh3-128-64MiB-blocks:"  # marks a block digest (and its entries in the cache)
SHA256_BLOCKS = "sha256-64MiB-blocks:"  # the block digests of older manifests
_BLOCK_HASHES: dict[str, Callable] = {BLOCKS: xxhash.xxh3_128, SHA256_BLOCKS: hashlib.sha256}
BLOCK_SIZE = 64 * 1024 * 1024
_READ = 4 * 1024 * 1024  # bytes read (and hashed) at a time


def _read_cache(cache_file: Path) -> dict:
    """The cache's entries ({} when it is missing or unreadable: it is then started again)."""
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def digest_kind(digest: str) -> str:
    """The block mark ``digest`` starts with (:data:`BLOCKS`, :data:`SHA256_BLOCKS`), or ""
    for a plain SHA-256."""
    return next((mark for mark in _BLOCK_HASHES if digest.startswith(mark)), "")


def file_digests(
    paths: Sequence[Path], cache: Path | None = None, blocks: bool | str = False
) -> list[str]:
    """Hex SHA-256 of each of ``paths`` (with ``blocks``: their :func:`block_digests`, of the
    kind it names, :data:`BLOCKS` for True); with a ``cache`` folder, remembered there while
    each file's size and modification time stay the same.

    The cache is read once. Files not in it are hashed without holding anything; their entries
    are then added under the cache's lock (``sha256.json.lock``) to the cache as it is by then,
    written to a temp file and renamed into place, so processes hashing at the same time (a
    parallel sweep) keep each other's entries and a reader never sees half a file."""
    paths = [Path(p).resolve() for p in paths]
    mark = (BLOCKS if blocks is True else blocks) or ""
    if mark:
        digest_all: Callable = lambda ps: block_digests(ps, mark=mark)  # noqa: E731
    else:
        digest_all = lambda ps: [file_sha256(p) for p in ps]  # noqa: E731
    if cache is None:
        return digest_all(paths)
    cache_file = Path(cache) / _CACHE_NAME
    known = _read_cache(cache_file)
    out: list[str | None] = []
    todo: dict[str, tuple[Path, list[int]]] = {}
    for path in paths:
        stat = path.stat()
        key, stamp = mark + str(path), [stat.st_size, stat.st_mtime_ns]
        seen = _SEEN.get((key, *stamp))
        hit = known.get(key)
        if seen is None and isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
            seen = _SEEN[(key, *stamp)] = str(hit[2])
        if seen is None:
            todo[key] = (path, stamp)
        out.append(seen)
    new: dict[str, list] = {}
    for key, (_, stamp), digest in zip(
        todo, todo.values(), digest_all([p for p, _ in todo.values()]), strict=True
    ):
        new[key] = [*stamp, digest]
        _SEEN[(key, *stamp)] = digest
    for i, path in enumerate(paths):
        if out[i] is None:
            out[i] = new[mark + str(path)][2]
    if new:
        try:
            with FileLock(str(cache_file) + ".lock"):
                write_json_atomic(cache_file, {**_read_cache(cache_file), **new})
        except OSError:  # a read-only cache folder: the digests are still right
            pass
    return out  # type: ignore[return-value]


def block_digests(
    paths: Sequence[Path], threads: int | None = None, mark: str = BLOCKS
) -> list[str]:
    """Each file's content identity, hashed on ``threads`` threads (default: every CPU): the
    hash of the concatenated hashes of its consecutive ``BLOCK_SIZE``-byte blocks, in hex after
    ``mark``, which names the hash (:data:`BLOCKS`: XXH3-128; :data:`SHA256_BLOCKS`). The
    blocks of all ``paths`` are shared out at once."""
    paths = [Path(p) for p in paths]
    new_hash = _BLOCK_HASHES[mark]
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY))
        sizes = [os.fstat(fd).st_size for fd in fds]
        jobs = [(i, at) for i, size in enumerate(sizes) for at in range(0, size, BLOCK_SIZE)]
        local = threading.local()

        def block(job: tuple[int, int]) -> bytes:
            i, at = job
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = memoryview(bytearray(_READ))
            h, end = new_hash(), min(at + BLOCK_SIZE, sizes[i])
            while at < end:
                got = os.preadv(fds[i], [buf[: min(_READ, end - at)]], at)
                if got <= 0:
                    raise OSError(f"{paths[i]} shrank while it was hashed")
                h.update(buf[:got])
                at += got
            return h.digest()

        workers = min(threads or usable_cpus(), len(jobs))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="cmmerge-hash") as pool:
                digests = list(pool.map(block, jobs))
        else:
            digests = [block(job) for job in jobs]
    finally:
        for fd in fds:
            os.close(fd)
    per_file: list[list[bytes]] = [[] for _ in paths]
    for (i, _), digest in zip(jobs, digests, strict=True):
        per_file[i].append(digest)
    return [mark + new_hash(b"".join(d)).hexdigest() for d in per_file]


def file_digest(path: Path, cache: Path | None = None, blocks: bool | str = False) -> str:
    """Hex SHA-256 (with ``blocks``: the block digest) of ``path``, cached as
    :func:`file_digests` says."""
    return file_digests([path], cache, blocks)[0]


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
