"""Content hashes of weights: right, cached by size and mtime, recomputed on change."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import xxhash

from cmmerge.io import hashes


def test_digest_is_sha256_cached_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"abc" * 1000)
    assert hashes.file_digest(f, cache) == hashlib.sha256(b"abc" * 1000).hexdigest()
    stored = json.loads((cache / "sha256.json").read_text())
    assert stored[str(f.resolve())][2] == hashlib.sha256(b"abc" * 1000).hexdigest()
    calls = []
    real = hashes.file_sha256
    monkeypatch.setattr(hashes, "file_sha256", lambda p: calls.append(p) or real(p))
    hashes.file_digest(f, cache)
    assert calls == []  # unchanged: from the cache
    f.write_bytes(b"abd" * 1000)
    os.utime(f, ns=(1, 1))  # same size, other mtime
    assert hashes.file_digest(f, cache) == hashlib.sha256(b"abd" * 1000).hexdigest()
    assert len(calls) == 1


def test_folder_digest_single_file_and_shards(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    one = tmp_path / "one"
    one.mkdir()
    (one / "model.safetensors").write_bytes(b"w")
    (one / "config.json").write_text("{}")
    assert hashes.weights_digest(one, cache) == hashlib.sha256(b"w").hexdigest()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, data in enumerate((b"a", b"b"), 1):
        (shards / f"model-0000{i}-of-00002.safetensors").write_bytes(data)
    lines = "".join(
        f"model-0000{i}-of-00002.safetensors {hashlib.sha256(d).hexdigest()}\n"
        for i, d in enumerate((b"a", b"b"), 1)
    )
    assert hashes.weights_digest(shards, cache) == hashlib.sha256(lines.encode()).hexdigest()
    (tmp_path / "cache" / "sha256.json").write_text("not json")  # a broken cache is rebuilt
    assert hashes.describe(one, cache) == {
        "path": str(one),
        "sha256": hashlib.sha256(b"w").hexdigest(),
    }


def _hash_slowly(path, cache, barrier, locked):
    """In a child process: hash ``path`` into ``cache`` once both children are ready, with the
    cache write held back 0.3 s (inside the lock), so two unguarded writers would overlap."""
    import contextlib
    import time

    real = hashes.write_json_atomic

    def slow_write(*args):
        time.sleep(0.3)
        real(*args)

    hashes.write_json_atomic = slow_write
    if not locked:  # the race the lock prevents, for the test below
        hashes.FileLock = lambda *a, **k: contextlib.nullcontext()
    barrier.wait()
    hashes.file_digest(path, cache)


def _hash_in_two_processes(tmp_path, locked):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    cache = tmp_path / "cache"
    cache.mkdir()
    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.safetensors")
        files[-1].write_bytes(name.encode() * 1000)
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_hash_slowly, args=(f, cache, barrier, locked)) for f in files]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return files, json.loads((cache / "sha256.json").read_text())


def test_two_processes_hashing_at_once_keep_both_entries(tmp_path):
    files, stored = _hash_in_two_processes(tmp_path, locked=True)
    for f in files:
        assert stored[str(f.resolve())][2] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert not list((tmp_path / "cache").glob(".sha256.json.*"))  # no temp file left


def test_the_race_is_real_without_the_lock(tmp_path):
    """The test above forces the overlap: without the lock one entry is lost."""
    files, stored = _hash_in_two_processes(tmp_path, locked=False)
    assert len([f for f in files if str(f.resolve()) in stored]) == 1


@pytest.mark.parametrize(
    "mark, new_hash",
    [(hashes.BLOCKS, xxhash.xxh3_128), (hashes.SHA256_BLOCKS, hashlib.sha256)],
    ids=["xxh3", "sha256-of-older-manifests"],
)
def test_block_digest_is_the_hash_of_its_block_hashes_on_any_thread_count(
    tmp_path, monkeypatch, mark, new_hash
):
    monkeypatch.setattr(hashes, "BLOCK_SIZE", 1000)
    monkeypatch.setattr(hashes, "_READ", 300)  # reads that do not divide a block
    files = {"empty": b"", "one": b"x" * 999, "many": os.urandom(5500)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    blocks = [[data[i : i + 1000] for i in range(0, len(data), 1000)] for data in files.values()]
    want = [
        mark + new_hash(b"".join(new_hash(b).digest() for b in bs)).hexdigest() for bs in blocks
    ]
    paths = [tmp_path / name for name in files]
    assert hashes.block_digests(paths, threads=1, mark=mark) == want
    assert hashes.block_digests(paths, threads=3, mark=mark) == want
    assert hashes.digest_kind(want[2]) == mark
    cache = tmp_path / "cache"
    cache.mkdir()
    assert hashes.file_digest(paths[2], cache, blocks=mark) == want[2]
    assert hashes.file_digest(paths[2], cache) == hashlib.sha256(files["many"]).hexdigest()
    assert hashes.digest_kind(hashlib.sha256(files["many"]).hexdigest()) == ""
    stored = json.loads((cache / "sha256.json").read_text())  # one entry per kind of digest
    assert stored[mark + str(paths[2].resolve())][2] == want[2]
    assert stored[str(paths[2].resolve())][2] == hashlib.sha256(files["many"]).hexdigest()
