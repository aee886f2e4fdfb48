"""Run one stage: skip it when finished with the same config and inputs, else do it and write
its manifest last, atomically."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmmerge import __version__, dist
from cmmerge.errors import CmmergeError
from cmmerge.io import ownership, transaction
from cmmerge.io.hashes import content_digest
from cmmerge.io.manifest import (
    MANIFEST,
    fingerprint,
    git_revision,
    manifest_hash,
    read_manifest,
    write_json_atomic,
)
from cmmerge.stages.registry import stage_of

if TYPE_CHECKING:
    from cmmerge.config.specs import StageSpec

log = logging.getLogger("cmmerge")


@dataclass(frozen=True)
class RunContext:
    """What the runner takes from a command besides the stage itself: the run directory it
    writes into, whether ``force=true`` redoes a finished stage, the seed it records, and the
    command typed (its name and overrides: a pipeline's or a sweep's own when one runs the
    stage), which a manifest records and a failed stage names for its rerun."""

    run_root: str
    run_name: str
    force: bool = False
    seed: int | None = None
    command: str | None = None
    overrides: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root).expanduser() / self.run_name


def stage_input(stage_dir: Path, hint: str) -> dict:
    """An upstream stage this one reads: it must be whole and finished, and fresh (every stage
    it was made from is still the version it recorded); ``hint`` says how to make it."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise CmmergeError(
            f"{stage_dir} is not a finished stage (no {MANIFEST}): run `{hint}` first"
        )
    reason = transaction.problem(stage_dir, manifest)
    if reason is not None:
        raise CmmergeError(f"{stage_dir} is incomplete ({reason}): run `{hint}` again")
    stale = transaction.stale_inputs(manifest)
    if stale:
        raise CmmergeError(
            f"{stage_dir} is stale: {stale[0]} changed since it was made: run `{hint}` again"
        )
    return {"path": str(stage_dir), "manifest_sha256": manifest_hash(stage_dir)}


def folder_input(folder: Path, cache: Path | None = None) -> dict:
    """An external folder this stage reads (a base model, a user's checkpoint): a finished
    stage by its manifest, anything else by the SHA-256 of its files' contents (remembered in
    ``cache`` by path, size and modification time)."""
    folder = Path(folder)
    if read_manifest(folder) is not None:
        return {"path": str(folder), "manifest_sha256": manifest_hash(folder)}
    return {"path": str(folder), "sha256": content_digest(folder, cache)}


def _versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (importing peft or datasets costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"cmmerge": __version__, "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "datasets", "safetensors", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


STARTED = ".started.json"  # in a partial folder: the command that is making it


def resume_command(run: RunContext, stage: str) -> str:
    """The command that makes this stage again, from the configuration it was started with:
    the command typed (a pipeline's or a sweep's own, when one runs it) and its overrides."""
    if run.command is not None:
        job, overrides = run.command, list(run.overrides)
    else:  # not from the command line: the run directory at least
        job, overrides = stage, [f"run.root={run.run_root}", f"run.name={run.run_name}"]
    kept = [o for o in overrides if not o.startswith(("force=", "debug="))]
    return " ".join(["cmmerge", job, *map(shlex.quote, kept)])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_stage(
    run: RunContext,
    spec: StageSpec,
    inputs: list[dict],
    work: Callable[[Path], dict[str, Any]],
    *,
    folder: Path | None = None,
    place: str = ownership.RUN,
) -> dict:
    """Do the stage ``spec`` describes as a transaction (:func:`run_transaction`): its name,
    folder and recorded config come from the spec, how it runs (on every rank of a launch,
    resumable) from its entry in the stage registry; ``folder`` replaces the spec's (a merge's
    ``output=``, with ``place`` saying where that is)."""
    entry = stage_of(spec)
    return run_transaction(
        run,
        entry.name,
        spec.folder if folder is None else folder,
        spec.config_view(),
        inputs,
        work,
        all_ranks=entry.all_ranks,
        resumable=entry.resumable,
        place=place,
    )


def run_transaction(
    run: RunContext,
    stage: str,
    stage_dir: Path,
    config_view: dict[str, Any],
    inputs: list[dict],
    work: Callable[[Path], dict[str, Any]],
    all_ranks: bool = False,
    resumable: bool = False,
    place: str = ownership.RUN,
) -> dict:
    """Do ``work(folder)`` as a transaction unless an identical finished stage is there; return
    the manifest.

    The stage's lock is held throughout (a second process on the same stage waits, then finds
    it finished). ``work`` writes into a partial folder beside ``stage_dir``, which is renamed
    into place with its manifest, so a stage is finished exactly when its folder has a whole
    manifest whose listed files are all there.

    Args:
        run: the run directory, ``force``, the seed and the command recorded
            (:func:`cmmerge.config.values.run_context`).
        stage: stage name for the manifest.
        stage_dir: the stage's folder in the run directory.
        config_view: the part of the config that determines this stage's result.
        inputs: upstream stages and folders (from :func:`stage_input` / :func:`folder_input`).
        work: does the stage in the folder it is given; returns a dict with ``metrics`` and
            ``outputs`` (and anything else worth recording).
        all_ranks: under a multi-process launch, every process runs ``work`` (training,
            prediction); otherwise rank 0 alone does and the others wait. Rank 0 alone writes
            the manifest either way.
        resumable: a partial folder left by an interrupted run of the same attempt is kept for
            ``work`` to resume from (CPT checkpoints); otherwise every attempt starts empty.
        place: where ``stage_dir`` is, for the rule of what cmmerge may replace
            (:mod:`cmmerge.io.ownership`): a run directory's stage folder, or ``output=``.
    """
    stage_dir = Path(stage_dir)
    digest = fingerprint(config_view, inputs)
    asked = time.time()
    lock = transaction.stage_lock(stage_dir) if dist.is_main() else contextlib.nullcontext()
    with lock:
        if dist.is_main():
            transaction.recover(stage_dir)
        dist.barrier()
        previous = read_manifest(stage_dir)
        reason = None if previous is None else transaction.problem(stage_dir, previous)
        done = _up_to_date(run, stage, stage_dir, previous, reason, digest, inputs, asked)
        if done is not None:
            return done
        same_as = _begin(run, stage, stage_dir, previous, reason, digest, inputs, resumable, place)
        partial = transaction.partial_dir(stage_dir)
        manifest: dict = {}
        try:
            if dist.is_main() or all_ranks:
                manifest = _do(run, stage, stage_dir, partial, config_view, inputs, work, digest)
            dist.barrier()
            if dist.is_main():
                _finish(run, stage, stage_dir, partial, manifest, same_as, place)
        except BaseException as err:
            user = _failed(err, run, stage, stage_dir, partial, resumable)
            if user is not None and user is not err:
                raise user from err
            raise
        dist.barrier()
    if not dist.is_main():
        manifest = read_manifest(stage_dir) or {}
    manifest["skipped"] = False
    return manifest


def _up_to_date(
    run: RunContext,
    stage: str,
    stage_dir: Path,
    previous: dict | None,
    reason: str | None,
    digest: str,
    inputs: list[dict],
    asked: float,
) -> dict | None:
    """The manifest of the finished stage in ``stage_dir`` when it is whole, made from the same
    config and inputs, and not to be redone (``force=true`` does not redo a stage another
    process finished while this one waited for the lock); else None."""
    if previous is None or reason is not None or not _same_stage(previous, digest, inputs):
        return None
    just_made = (stage_dir / MANIFEST).stat().st_mtime >= asked  # by another process
    if run.force and not just_made:
        return None
    if dist.is_main():
        _clear_failure(stage_dir)  # an earlier failure of it no longer stands
    log.info("%s: up to date in %s, skipped (force=true redoes it)", stage, stage_dir)
    previous["skipped"] = True
    return previous


def _begin(
    run: RunContext,
    stage: str,
    stage_dir: Path,
    previous: dict | None,
    reason: str | None,
    digest: str,
    inputs: list[dict],
    resumable: bool,
    place: str,
) -> list[str]:
    """Claim ``stage_dir`` (refused when it is not cmmerge's to replace), set the old version
    aside and prepare the partial folder; returns the versions the new one equals."""
    if dist.is_main():  # before anything in it is touched: may cmmerge replace it?
        key = "output" if place == ownership.OUTPUT else None
        ownership.claim(stage_dir, stage, place, run.force, key)
    same_as = _same_version(stage, stage_dir, previous, reason, digest, inputs)
    if previous is not None:
        why = reason or ("force=true" if run.force else "config or inputs changed")
        log.info("%s: redoing %s (%s)", stage, stage_dir, why)
    dist.barrier()  # every rank has read the old manifest before rank 0 removes it
    if dist.is_main():
        transaction.invalidate(stage_dir)
        transaction.prepare(stage_dir, digest, resumable)
        command = resume_command(run, stage)
        write_json_atomic(transaction.partial_dir(stage_dir) / STARTED, {"command": command})
    dist.barrier()
    return same_as


def _failed(
    err: BaseException,
    run: RunContext,
    stage: str,
    stage_dir: Path,
    partial: Path,
    resumable: bool,
) -> CmmergeError | None:
    """Record a failed attempt (and discard its partial folder unless it can be resumed or only
    its swap into place failed); returns the error as the user should read it, if any."""
    user = as_user_error(err, stage_dir) if isinstance(err, Exception) else None
    if dist.is_main():
        _record_failure(stage_dir, partial, user or err, run, resume_command(run, stage))
        finished = transaction.problem(partial) is None  # only its swap failed
        if not (resumable or finished):
            transaction.discard(stage_dir)
    return user


def _finish(
    run: RunContext,
    stage: str,
    stage_dir: Path,
    partial: Path,
    manifest: dict,
    same_as: list[str],
    place: str,
) -> None:
    """Seal the finished partial folder, write its manifest (sizes and contents of its files)
    and ownership record, and put it in place of ``stage_dir``."""
    transaction.seal(partial)
    (partial / STARTED).unlink(missing_ok=True)
    manifest["files"] = transaction.file_sizes(partial)
    manifest["digests"] = transaction.file_digests(partial, list(manifest["files"]))
    if same_as:
        manifest["same_as"] = same_as
    write_json_atomic(partial / MANIFEST, manifest)
    ownership.write_marker(partial, stage, place)
    try:
        transaction.commit(stage_dir, partial, run.force)
    except CmmergeError:  # a user's file in the way: the earlier version stands, untouched
        transaction.restore(stage_dir)
        transaction.discard(stage_dir)
        raise
    _clear_failure(stage_dir)


def _same_version(
    stage: str,
    stage_dir: Path,
    previous: dict | None,
    reason: str | None,
    digest: str,
    inputs: list[dict],
) -> list[str]:
    """For a deterministic stage pruned after use and made again with the same fingerprint:
    the manifest hashes of the versions the new one stands for, so that stages made from them
    stay fresh; else ``[]``."""
    if (
        stage not in transaction.DETERMINISTIC
        or previous is None
        or reason is not None
        or not transaction.pruned(stage_dir)
        or not _same_stage(previous, digest, inputs)
    ):
        return []
    earlier = previous.get("same_as")
    return [*(earlier if isinstance(earlier, list) else []), manifest_hash(stage_dir)]


def failure_file(stage_dir: Path) -> Path:
    """Where the last failure of a stage is recorded (for ``cmmerge status``)."""
    return stage_dir.parent / f".{stage_dir.name}.failed.json"


def _record_failure(
    stage_dir: Path, partial: Path, err: BaseException, run: RunContext, command: str
) -> None:
    """Keep the error and the stage's log beside the folder, where space allows (on a full
    disk the copy of the log is the first to go, and nothing here raises); the partial folder
    may go."""
    logfile = next(iter(partial.glob("*.log")), None)
    kept = None
    if logfile is not None and logfile.is_file():
        kept = stage_dir.parent / f".{stage_dir.name}.failed.log"
        try:
            shutil.copyfile(logfile, kept)
        except OSError:
            with contextlib.suppress(OSError):
                kept.unlink(missing_ok=True)
            kept = None
    record = {
        "error": f"{type(err).__name__}: {err}",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "log": str(kept) if kept else None,
        "overrides": list(run.overrides),
        "command": command,
    }
    with contextlib.suppress(OSError):
        write_json_atomic(failure_file(stage_dir), record)


def _clear_failure(stage_dir: Path) -> None:
    failure_file(stage_dir).unlink(missing_ok=True)
    (stage_dir.parent / f".{stage_dir.name}.failed.log").unlink(missing_ok=True)


def _do(run, stage, stage_dir, partial, config_view, inputs, work, digest) -> dict:
    handler = logging.FileHandler(partial / f"{stage}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("cmmerge", "transformers"):
        logging.getLogger(name).addHandler(handler)
    log.info("%s: running -> %s", stage, stage_dir)
    _reset_gpu_peak()
    start = time.time()
    try:
        result = work(partial)
    except CmmergeError:
        raise
    except BaseException as err:
        user_error = as_user_error(err, stage_dir, inputs)
        if user_error is not None:
            log.error("%s", user_error)
            raise user_error from err
        log.exception("%s failed", stage)  # our bug: the traceback goes into the stage's log
        raise
    finally:
        for name in ("cmmerge", "transformers"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
    return {
        "stage": stage,
        "status": "finished",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run.run_dir),
        "fingerprint": digest,
        "config": config_view,
        "overrides": list(run.overrides),
        "inputs": inputs,
        "outputs": result.pop("outputs", []),
        "metrics": result.pop("metrics", {}),
        "seed": config_view.get("seed", run.seed),
        "versions": _versions(),
        "git_revision": git_revision(),
        "wall_time_s": round(time.time() - start, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **_gpu_peak(),
        "world_size": dist.world_size(),
        **result,
    }


_DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES}


def as_user_error(
    err: BaseException, stage_dir: Path | str, inputs: list[dict] | None = None
) -> CmmergeError | None:
    """The error boundary: the one-line error for a failure the user's machine or files cause
    (disk full, a file size limit, no permission, out of memory, a model folder among
    ``inputs`` that a library failed to load: config, model type, weights or their shapes), or
    None for anything else (a bug, whose traceback is kept)."""
    if isinstance(err, CmmergeError):
        return err
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        return CmmergeError(
            f"cannot write the outputs of {stage_dir}{where}: {os.strerror(err.errno)}; "
            "free space or raise the limit, then run the same command again"
        )
    text = str(err)
    if type(err).__name__ == "SafetensorError" and ("too large" in text or "space" in text):
        return CmmergeError(
            f"cannot write the weights of {stage_dir}: {text}; free space or raise the file size "
            "limit, then run the same command again"
        )
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return CmmergeError(
            f"out of memory in {stage_dir}: lower the batch size or max_length, use peft=lora, "
            "or a machine with more memory"
        )
    loading = (
        type(err).__name__ == "SafetensorError"
        or (isinstance(err, OSError) and err.errno is None)  # transformers: "no file named ..."
        or _while_loading(err)
    )
    return _unreadable_model(inputs or []) if loading else None


# where a library loads a model folder: a failure raised through one of these is looked into
_LOADERS = frozenset(
    {"from_pretrained", "from_config", "get_config_dict", "load_state_dict", "load", "safe_open"}
)
_LIBRARIES = ("transformers", "torch", "safetensors", "peft", "cmmerge")


def _while_loading(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from) came through a library's loader."""
    seen = 0
    while err is not None and seen < 5:
        tb = err.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            if code.co_name in _LOADERS and any(
                f"{os.sep}{lib}{os.sep}" in code.co_filename for lib in _LIBRARIES
            ):
                return True
            tb = tb.tb_next
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _unreadable_model(inputs: list[dict]) -> CmmergeError | None:
    """When a library failed to load a model: the model folder among ``inputs`` (an
    ``init=DIR``, a base model, a stage's ``model/``) that is at fault (its config, model type,
    weights, or the two disagreeing), as one line naming it; None when they all look whole
    (then it was not them)."""
    from cmmerge.models.check import model_folder_problem

    for item in inputs:
        folder = Path(str(item.get("path", ""))) if isinstance(item, dict) else None
        if folder is None or not folder.is_dir():
            continue
        for model_dir in (folder, folder / "model"):
            if not (model_dir / "config.json").is_file():
                continue
            problem = model_folder_problem(model_dir)
            if problem is not None:
                return CmmergeError(
                    f"cannot load the model in {model_dir}: {problem}; "
                    "replace it (or choose another model), then run the same command"
                )
    return None


def _loaded_torch() -> Any:
    """torch if this process imported it, else None: a stage that never imported it used no
    GPU, and importing it only to ask would cost a merge about a second."""
    return sys.modules.get("torch")


def _reset_gpu_peak() -> None:
    """Start this stage's GPU peak from zero (a pipeline runs every stage in one process)."""
    torch = _loaded_torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> dict[str, float]:
    torch = _loaded_torch()
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def _same_stage(previous: dict, digest: str, inputs: list[dict] | None = None) -> bool:
    """Whether a finished manifest is the stage ``digest`` names: by its fingerprint, or by its
    recorded config and inputs hashed the way fingerprints are now (a setting added to
    :data:`~cmmerge.io.manifest.NOT_OUTPUT_SETTINGS` leaves recorded fingerprints valid), with each
    upstream stage re-made as the same version (its ``same_as`` lists the recorded hash: a
    pruned merge made again) standing for the version recorded."""
    if previous.get("fingerprint") == digest:
        return True
    recorded = previous.get("inputs")
    if "config" not in previous or not isinstance(recorded, list):
        return False
    if fingerprint(previous["config"], recorded) == digest:
        return True
    current = {str(i.get("path")): i for i in inputs or []}
    now = [_standing_for(r, current.get(str(r.get("path")))) for r in recorded]
    return now != recorded and fingerprint(previous["config"], now) == digest


def _standing_for(recorded: dict, current: dict | None) -> dict:
    """``current`` (an upstream stage's input entry now) when that stage's manifest says it is
    the same version as the one ``recorded``; else ``recorded``."""
    old = recorded.get("manifest_sha256") if isinstance(recorded, dict) else None
    if not old or not current or current.get("manifest_sha256") in (None, old):
        return recorded
    return current if transaction.stands_for(Path(current["path"]), old) else recorded
