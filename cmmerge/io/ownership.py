"""What cmmerge may replace or delete: the one rule, in one place.

cmmerge replaces a folder only when it can prove it made that folder for the same purpose: the
folder carries cmmerge's ownership record (:data:`MARKER`: a kind and schema marker, the stage
that wrote it, where it was written, a run directory's stage folder or a merge's ``output=``,
and the files it wrote), or, for folders written before that record existed, a whole cmmerge
manifest of that stage. Even then only the files it wrote are replaced or deleted:

- every other file in the folder (a ``NOTES.md`` added to an earlier merge) is kept, carried
  into the new version (hard-linked before the swap, so a kill at any moment loses nothing);
- one whose name an output takes stops the command with one line naming it; ``force=true``
  replaces it;
- a folder made for another purpose (another stage, a run directory's stage folder through
  ``merge output=``), or lying inside one, is never written: choose another folder;
- any other non-empty folder (a web app with its own ``manifest.json``) is written only with
  ``force=true``, and then as above: its files are kept, those an output names are replaced.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cmmerge.errors import CmmergeError
from cmmerge.io.manifest import MANIFEST, read_json, write_json_atomic

MARKER = ".cmmerge.json"  # inside every folder cmmerge commits: its ownership record
KIND = "cmmerge-folder"
SCHEMA = 1
RUN, OUTPUT = "run", "output"  # a run directory's stage folder; a merge's output=DIR
_LEGACY_FIELDS = ("stage", "status", "fingerprint", "files")
REPLACED = ".replaced-manifest.json"  # a manifest set aside while its stage is redone
# cmmerge's own files in a folder it made, whatever its record lists
_BOOKKEEPING = (MANIFEST, MARKER, "pruned.json", REPLACED)
_SHOWN = 4


@dataclass(frozen=True)
class Owner:
    """Who made a folder: the stage, where (:data:`RUN` or :data:`OUTPUT`) and its files."""

    stage: str
    place: str
    files: frozenset[str]


def write_marker(folder: Path, stage: str, place: str) -> None:
    """Record in ``folder`` (a partial folder about to be committed) that cmmerge's ``stage``
    wrote it at ``place``, with every file it holds now."""
    files = sorted(_files(folder) - {MARKER})
    record = {"kind": KIND, "schema": SCHEMA, "stage": stage, "place": place, "files": files}
    write_json_atomic(Path(folder) / MARKER, record)


def owner(folder: Path) -> Owner | None:
    """The proof that cmmerge made ``folder``, or None: its ownership record, or a whole
    manifest of an older cmmerge (its listed files; a merge whose output is the folder itself
    was an ``output=`` merge)."""
    folder = Path(folder)
    record = _read(folder / MARKER)
    if (
        isinstance(record, dict)
        and record.get("kind") == KIND
        and isinstance(record.get("schema"), int)
        and isinstance(record.get("stage"), str)
        and record.get("place") in (RUN, OUTPUT)
        and isinstance(record.get("files"), list)
    ):
        files = frozenset(str(f) for f in record["files"])
        return Owner(record["stage"], record["place"], files | frozenset(_BOOKKEEPING))
    manifest = _read(folder / MANIFEST)
    if manifest is None:
        manifest = _read(folder / REPLACED)  # set aside while it is redone
    if not _legacy_manifest(manifest):
        return None
    place = OUTPUT if manifest["stage"] == "merge" and manifest.get("outputs") == ["."] else RUN
    return Owner(manifest["stage"], place, frozenset(manifest["files"]) | frozenset(_BOOKKEEPING))


def claim(folder: Path, stage: str, place: str, force: bool, key: str | None = None) -> None:
    """Refuse, in one line, to write ``stage``'s outputs into ``folder`` unless the rule of
    this module allows it (``key``, e.g. ``output``, names the setting in the message)."""
    folder = Path(folder)
    what = f"{key}={folder}" if key else str(folder)
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise CmmergeError(
                f"{what}: {parent} is a file, not a folder: choose a folder for the outputs"
            )
    for parent in folder.parents:
        made = owner(parent)
        if made is not None:
            raise CmmergeError(
                f"{what} lies inside {parent}, a {made.stage} folder cmmerge made: writing there "
                "would damage it; choose a folder outside it"
            )
    if not folder.exists():
        return
    made = owner(folder)
    if made is not None and (made.stage != stage or made.place != place):
        where = "an output= merge" if made.place == OUTPUT else "a run directory's stage"
        raise CmmergeError(
            f"{what} is {where} folder of cmmerge {made.stage}, not one {stage} "
            f"{'writes here' if place == RUN else 'makes through output='}: it is never replaced "
            "(force=true or not); choose another folder"
        )
    if made is None:
        theirs = sorted(_files(folder))
        if theirs and not force:
            raise CmmergeError(
                f"{what} holds files cmmerge did not write ({_names(theirs)}): choose a new or "
                "empty folder, or force=true to write into it (its files are kept, those with "
                "an output's name replaced)"
            )


def foreign(folder: Path) -> list[str]:
    """The files (relative paths) in ``folder`` that cmmerge did not write there."""
    made = owner(folder)
    files = _files(folder)
    if made is None:
        return sorted(files)
    parents = {p.as_posix() for f in made.files for p in Path(f).parents}
    return sorted(files - made.files - parents)  # an emptied folder of its own is its own


def carry_foreign(folder: Path, new: Path, force: bool) -> None:
    """Before ``new`` replaces ``folder``: give ``new`` every file of ``folder`` that cmmerge
    did not write (hard links, or copies where links fail; the originals stay until the swap).
    One whose name ``new`` already uses stops with one line naming it, unless ``force``."""
    folder, new = Path(folder), Path(new)
    if not folder.is_dir():
        return
    keep = [n for n in foreign(folder) if not (_empty_dir(folder / n) and (new / n).is_dir())]
    taken = [name for name in keep if _taken(new, name) and not _same(folder, new, name)]
    if taken and not force:
        raise CmmergeError(
            f"{folder} holds files cmmerge did not write whose names its new outputs take "
            f"({_names(taken)}): move them away, or force=true to replace them"
        )
    for name in keep:
        if name in taken:
            continue
        src, dst = folder / name, new / name
        if dst.exists() or dst.is_symlink():
            continue  # carried already (a swap that a kill cut short, done again)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if _empty_dir(src):
            dst.mkdir()
            continue
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                shutil.copy2(src, dst)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _taken(new: Path, name: str) -> bool:
    """Whether ``new`` has ``name``, or a file where one of its parent folders would go."""
    path = new / name
    if path.exists() or path.is_symlink():
        return True
    return any(p.is_file() for p in path.parents if p != new and new in p.parents)


def _same(folder: Path, new: Path, name: str) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(folder / name, new / name)
    return False


def _files(folder: Path) -> set[str]:
    """Relative paths of the files, links and empty folders under ``folder``."""
    out = set()
    for path in Path(folder).rglob("*"):
        if path.is_symlink() or path.is_file() or (path.is_dir() and not any(path.iterdir())):
            out.add(path.relative_to(folder).as_posix())
    return out


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _read(path: Path) -> object:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _legacy_manifest(manifest: object) -> bool:
    return (
        isinstance(manifest, dict)
        and all(k in manifest for k in _LEGACY_FIELDS)
        and isinstance(manifest["stage"], str)
        and isinstance(manifest["fingerprint"], str)
        and len(manifest["fingerprint"]) == 64
        and isinstance(manifest["files"], dict)
    )
