"""Run directory bookkeeping: atomic JSON writes, stage manifests and fingerprints.

A stage is finished exactly when its ``manifest.json`` exists; it is written last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl_atomic(path: Path, rows) -> None:
    """Write one JSON object a line to ``path`` via a temp file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(stage_dir: Path) -> dict | None:
    """The stage's manifest, or None when the stage is not finished (or the file is unreadable)."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def manifest_hash(stage_dir: Path) -> str | None:
    """The SHA-256 of the stage's manifest, or None when there is none (or it went away while
    read: a stage being redone beside this process)."""
    try:
        return file_sha256(Path(stage_dir) / MANIFEST)
    except OSError:
        return None


# Settings of the training sections that only change how fast or how verbosely a stage runs
# (logging, checkpoint frequency, experiment trackers): left out of the folder ids
# (:mod:`cmmerge.config.ids`) and of the fingerprints, so turning on TensorBoard or logging more
# often neither renames nor redoes a finished stage.
NOT_OUTPUT_SETTINGS = frozenset({"logging_steps", "report_to", "save_steps"})
# The fine-tuning settings that list an arm's other tasks (Sequential FT, Joint FT): the arm's
# readable name and folder name carry them.
ARM_TASK_LISTS = frozenset({"sequential", "joint"})
TRAINING_SECTIONS = ("cpt", "finetune")
# Settings added after stages were made, at the value that does what those stages did: left out
# of the fingerprints at that value, so a finished stage is not redone for a setting it followed.
NEUTRAL_SETTINGS = {"head_warmup_steps": 0, "head_warmup_lr": None}


def output_view(config_view: Any) -> Any:
    """``config_view`` without the :data:`NOT_OUTPUT_SETTINGS` of its training sections, nor
    their :data:`NEUTRAL_SETTINGS` at the neutral value: what the fingerprint hashes."""
    if not isinstance(config_view, dict):
        return config_view
    out = dict(config_view)
    for section in TRAINING_SECTIONS:
        if isinstance(out.get(section), dict):
            out[section] = {
                k: v
                for k, v in out[section].items()
                if k not in NOT_OUTPUT_SETTINGS
                and not (k in NEUTRAL_SETTINGS and v == NEUTRAL_SETTINGS[k])
            }
    return out


def fingerprint(config_view: Any, inputs: list[dict]) -> str:
    """Hash of what determines a stage's result: its config view (less the settings that do
    not change outputs, :func:`output_view`) and its inputs' hashes."""
    blob = json.dumps(
        {"config": output_view(config_view), "inputs": inputs}, sort_keys=True, default=str
    )
    return sha256_bytes(blob.encode())


def git_revision() -> str | None:
    """The git revision of the cmmerge source tree, when it is a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
