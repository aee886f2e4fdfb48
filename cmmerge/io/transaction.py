"""Stage folders as transactions: a lock beside the folder, outputs built in a partial folder and
renamed into place with their manifest, and a manifest that is trusted only when it is whole.

Layout beside a stage folder ``<parent>/<name>``:

- ``.<name>.lock``: the ``filelock`` lock held while the stage runs (released by the OS when a
  process dies, so a dead process never blocks a later run);
- ``.partial-<name>/``: where the stage writes; it holds ``.fingerprint`` (the identity of the
  attempt, so only the same attempt resumes in it) and, once finished, ``manifest.json``;
- ``.old-<name>-<token>/``: the replaced folder during the swap, removed right after.

A kill at any moment leaves either the old folder (or none) in place, never a folder that looks
finished but is not; the next run under the lock completes a swap that was cut short, removes
leftovers and starts again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from stat import S_ISREG

from filelock import FileLock

from cmmerge.errors import CmmergeError
from cmmerge.io import ownership
from cmmerge.io.hashes import (
    block_digests,
    content_digest,
    default_cache,
    digest_kind,
    file_digest,
)
from cmmerge.io.manifest import (
    MANIFEST,
    manifest_hash,
    read_json,
    read_manifest,
    write_json_atomic,
)

REQUIRED_FIELDS = ("stage", "status", "fingerprint", "files")
_FINGERPRINT_FILE = ".fingerprint"
PRUNED = "pruned.json"  # beside the manifest: outputs deleted on purpose after use
# Stages whose outputs are a pure function of their fingerprint (merges: tensor arithmetic in
# float32 on the CPU): made again after pruning with the same fingerprint, they are the same
# version, and the manifest lists the hashes of the versions it stands for (``same_as``).
DETERMINISTIC = frozenset({"merge"})


def lock_path(stage_dir: Path) -> Path:
    return stage_dir.parent / f".{stage_dir.name}.lock"


def partial_dir(stage_dir: Path) -> Path:
    return stage_dir.parent / f".partial-{stage_dir.name}"


@contextlib.contextmanager
def stage_lock(stage_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``stage_dir`` (waiting for another process that holds it)."""
    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path(stage_dir))):
        yield


def is_locked(stage_dir: Path) -> bool:
    """True while some process holds the lock of ``stage_dir`` (``cmmerge status``)."""
    if not lock_path(stage_dir).exists():
        return False
    lock = FileLock(str(lock_path(stage_dir)), timeout=0)
    try:
        lock.acquire()
    except TimeoutError:
        return True
    lock.release()
    return False


def file_sizes(folder: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``folder`` but its manifest."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in (MANIFEST, ownership.MARKER):
            out[path.relative_to(folder).as_posix()] = path.stat().st_size
    return out


def file_digests(folder: Path, names: Sequence[str]) -> dict[str, list]:
    """``{relative path: [mtime_ns, block digest]}`` of the files ``names`` under ``folder``
    (:func:`~cmmerge.io.hashes.block_digests`, hashed on every core): what :func:`changed`
    compares against (the time as the fast path, the content when it differs)."""
    paths = [Path(folder) / name for name in names]
    times = [path.stat().st_mtime_ns for path in paths]
    digests = block_digests(paths)
    return {name: [t, d] for name, t, d in zip(names, times, digests, strict=True)}


def changed(stage_dir: Path, manifest: dict) -> str | None:
    """The first output of a finished stage rewritten in place since its manifest was written
    (same size, other content), or None. A file whose modification time is the recorded one is
    taken as unchanged; another time costs a content hash (remembered by size and time in the
    hash cache), as git does."""
    digests = manifest.get("digests")
    if not isinstance(digests, dict):
        return None  # written before contents were recorded: sizes only
    for name, (mtime, digest) in digests.items():
        path = Path(stage_dir) / name
        try:
            if path.stat().st_mtime_ns == mtime:
                continue
            kind = digest_kind(str(digest))  # as it was recorded (older manifests: SHA-256)
            if file_digest(path, default_cache(), kind) != digest:
                return f"{name} changed since it was written (same size, other content)"
        except OSError:
            continue  # missing: reported by problem()
    return None


def problem(stage_dir: Path, manifest: dict | None = None, content: bool = True) -> str | None:
    """Why ``stage_dir`` is not a finished stage, or None when it is: its manifest must parse,
    carry its fields and say finished, and every file it lists must be there with its size
    (and, with ``content``, its content: :func:`changed`)."""
    manifest = read_manifest(stage_dir) if manifest is None else manifest
    if manifest is None:
        return f"no readable {MANIFEST}"
    if not isinstance(manifest, dict) or any(k not in manifest for k in REQUIRED_FIELDS):
        return f"{MANIFEST} lacks its fields (written by another version, or damaged)"
    if manifest["status"] != "finished" or not isinstance(manifest["files"], dict):
        return f"{MANIFEST} does not describe a finished stage"
    for name, size in manifest["files"].items():
        try:
            found = (stage_dir / name).stat()
        except OSError:
            found = None
        if found is None or not S_ISREG(found.st_mode):
            # the record is read only now that the file is seen missing: a prune writes it
            # before it deletes, so a prune running beside this check is always seen
            if _covered(name, pruned(stage_dir)):
                continue  # deleted on purpose after use (keep_merged / keep_models)
            return f"{name} is missing"
        if found.st_size != size:
            return f"{name} has {found.st_size} bytes, {size} when it was written"
    return changed(stage_dir, manifest) if content else None


def stale_inputs(manifest: dict, _seen: frozenset[str] = frozenset()) -> list[str]:
    """The inputs ``manifest`` recorded that are no longer the version it used: an upstream
    stage redone, or whose outputs were rewritten in place, or itself stale; an external folder
    or file (a base model, a data file) whose content changed."""
    out = []
    for item in manifest.get("inputs") or []:
        if not isinstance(item, dict) or "path" not in item:
            continue
        path = Path(str(item["path"]))
        recorded = item.get("manifest_sha256")
        if recorded:
            if manifest_hash(path) != recorded and not stands_for(path, recorded):
                out.append(str(path))
            elif str(path) not in _seen and _upstream_changed(path, _seen | {str(path)}):
                out.append(str(path))
        elif isinstance(item.get("sha256"), str) and path.exists():
            try:
                if content_digest(path) != item["sha256"]:
                    out.append(str(path))
            except OSError:
                continue
    return out


def _upstream_changed(stage_dir: Path, seen: frozenset[str]) -> bool:
    """Whether the finished upstream ``stage_dir`` had its outputs rewritten in place or is
    stale itself."""
    upstream = read_manifest(stage_dir)
    if not isinstance(upstream, dict):
        return False
    return changed(stage_dir, upstream) is not None or bool(stale_inputs(upstream, seen))


def stands_for(stage_dir: Path, recorded: str) -> bool:
    """Whether the stage in ``stage_dir`` was made again as the same version as the one whose
    manifest hash is ``recorded`` (its manifest's ``same_as`` lists it)."""
    manifest = read_manifest(Path(stage_dir))
    same_as = manifest.get("same_as") if isinstance(manifest, dict) else None
    return isinstance(same_as, list) and recorded in same_as


def finished_manifest(stage_dir: Path) -> dict | None:
    """The manifest of ``stage_dir`` when it is a whole, finished stage, else None."""
    manifest = read_manifest(stage_dir)
    return manifest if manifest is not None and problem(stage_dir, manifest) is None else None


def recover(stage_dir: Path) -> None:
    """Under the lock: finish a swap that a kill cut short (a whole, finished partial folder
    beside no folder, or beside the unfinished one it was to replace), and remove replaced
    folders."""
    partial = partial_dir(stage_dir)
    if (partial / MANIFEST).is_file() and problem(partial) is None:
        if not stage_dir.exists():
            os.replace(partial, stage_dir)
        elif read_manifest(stage_dir) is None:  # invalidated before the redo: replace it
            with contextlib.suppress(CmmergeError):  # a user's file in the way: redone, asked
                commit(stage_dir, partial)
    for old in stage_dir.parent.glob(f".old-{stage_dir.name}-*"):
        shutil.rmtree(old, ignore_errors=True)


def prepare(stage_dir: Path, attempt: str, resumable: bool) -> Path:
    """An empty partial folder for this attempt, or, when ``resumable``, the one an interrupted
    run of the very same attempt left (its checkpoints are resumed from)."""
    partial = partial_dir(stage_dir)
    marker = partial / _FINGERPRINT_FILE
    same = marker.is_file() and marker.read_text() == attempt
    if partial.exists() and not (resumable and same):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / MANIFEST).unlink(missing_ok=True)
    marker.write_text(attempt)
    return partial


def seal(partial: Path) -> None:
    """Mark a partial folder whose work is done (no longer resumable; its manifest comes next)."""
    (partial / _FINGERPRINT_FILE).unlink(missing_ok=True)


def commit(stage_dir: Path, partial: Path, force: bool = False) -> None:
    """Put the finished ``partial`` folder (manifest inside) in the place of ``stage_dir``; the
    files in ``stage_dir`` that cmmerge did not write are kept
    (:func:`cmmerge.io.ownership.carry_foreign`)."""
    old = None
    if stage_dir.exists():
        ownership.carry_foreign(stage_dir, partial, force)
        old = stage_dir.parent / f".old-{stage_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(stage_dir, old)
    os.replace(partial, stage_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(stage_dir: Path) -> None:
    """Remove a failed attempt's partial folder (a resumable one is kept for the next run)."""
    shutil.rmtree(partial_dir(stage_dir), ignore_errors=True)


REPLACED = ownership.REPLACED  # an invalidated manifest, kept until the swap


def invalidate(stage_dir: Path) -> None:
    """Make ``stage_dir`` unfinished (its manifest set aside) before it is redone in place of
    itself: a consumer never pairs the old outputs with a newer upstream."""
    if (stage_dir / MANIFEST).is_file():
        os.replace(stage_dir / MANIFEST, stage_dir / REPLACED)


def restore(stage_dir: Path) -> None:
    """Make the version :func:`invalidate` set aside finished again (its redo was never put in
    place: a user's file was in the way)."""
    if (stage_dir / REPLACED).is_file() and not (stage_dir / MANIFEST).exists():
        os.replace(stage_dir / REPLACED, stage_dir / MANIFEST)


def _covered(name: str, outputs: Sequence[str]) -> bool:
    """Whether the relative path ``name`` is one of ``outputs`` or inside one (``model/``)."""
    return any(name == o.rstrip("/") or (o.endswith("/") and name.startswith(o)) for o in outputs)


def pruned(stage_dir: Path) -> list[str]:
    """The outputs of ``stage_dir`` deleted on purpose after use (``model/``...), from its
    ``pruned.json``; ``[]`` when nothing was."""
    path = Path(stage_dir) / PRUNED
    try:
        record = read_json(path) if path.is_file() else {}
    except (OSError, ValueError):
        return []
    return [str(p) for p in record.get("pruned") or []] if isinstance(record, dict) else []


def prune(stage_dir: Path, drop: Sequence[str]) -> int:
    """Delete the outputs ``drop`` (relative paths, folders ending in ``/``) of a finished stage
    and record them in ``pruned.json``; the stage stays finished (its manifest, and so every
    downstream stage's record of it, unchanged). The record is written before anything is
    deleted, under the stage's lock. Returns the bytes freed (0 when the stage is not finished
    or nothing was there)."""
    stage_dir = Path(stage_dir)
    with stage_lock(stage_dir):
        manifest = read_manifest(stage_dir)
        if manifest is None or problem(stage_dir, manifest) is not None:
            return 0
        present = [d for d in drop if (stage_dir / d.rstrip("/")).exists()]
        if not present:
            return 0
        files = manifest["files"]
        freed = sum(size for name, size in files.items() if _covered(name, present))
        record = {"pruned": sorted({*pruned(stage_dir), *drop}), "bytes": freed}
        write_json_atomic(stage_dir / PRUNED, record)
        for name in present:
            target = stage_dir / name.rstrip("/")
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    return freed


def pruned_output(path: Path) -> Path | None:
    """The stage folder whose ``pruned.json`` says ``path`` (an output inside it, e.g. its
    ``model/``) was deleted after use, or None."""
    path = Path(path)
    for stage_dir in list(path.parents)[:3]:
        gone = pruned(stage_dir)
        if gone:
            if _covered(path.relative_to(stage_dir).as_posix(), gone):
                return stage_dir
    return None
