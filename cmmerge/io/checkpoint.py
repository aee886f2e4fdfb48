"""Streaming safetensors I/O: nothing here loads a whole model.

``CheckpointReader`` parses safetensors headers itself (checking them against the file size, so
a truncated file is caught before any work) and reads tensors, or flat element ranges of them,
with ``pread`` into the caller's buffers, or as views of the file mapped into memory
(:meth:`CheckpointReader.view`, no copy: half the cost of a read from the page cache) that the
caller gives back with :meth:`CheckpointReader.release`, so resident memory stays what the
caller holds. (A file truncated by another process while it is mapped ends the process with
SIGBUS, as it does for every reader that maps weights; the header check catches a file that
was short before.)
``StreamingFileWriter`` writes one file from a declared layout, tensor by tensor or chunk by
chunk, from any thread (``pwrite``); ``ShardedWriter`` spreads a declared layout over shards of
at most ``max_shard_size`` bytes with an HF index. Both write temp files and rename on close.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cmmerge.errors import CmmergeError
from cmmerge.io.dtypes import DTYPES, F32, DType, as_dtype, from_torch, to_float32, to_torch
from cmmerge.io.manifest import file_sha256 as sha256_file  # noqa: F401 (public name)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
_MAX_HEADER = 100 * 1024**2

Layout = dict[str, tuple[DType, tuple[int, ...]]]


def _bytes_view(array: np.ndarray) -> np.ndarray:
    """A uint8 view of a contiguous array's memory."""
    return array.reshape(-1).view(np.uint8)


def _reserve(fd: int, nbytes: int, path: Path) -> None:
    """Size a new file to ``nbytes`` with its blocks allocated up front: a full disk fails here,
    not half-way, and chunked writes into allocated blocks cost far less system time than
    writes into a sparse file (ext4: 0.4 s instead of 1.5-4 s for 2.4 GB)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CmmergeError(f"no space left for {path} ({nbytes / 2**30:.2f} GiB)") from None
        os.ftruncate(fd, nbytes)  # a file system without fallocate
    except AttributeError:  # not POSIX
        os.ftruncate(fd, nbytes)


class _SafetensorsFile:
    """One safetensors file: its validated header and ``pread`` access to its data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise CmmergeError(f"cannot read safetensors file {path}: {exc}") from None
        try:
            self.entries, self.metadata, self.data_start = self._parse(size)
        except CmmergeError:
            os.close(self.fd)
            raise
        self.size = size
        self._mapped: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        self._map_lock = threading.Lock()

    def _parse(self, size: int) -> tuple[dict, dict[str, str], int]:
        bad = f"cannot read safetensors file {self.path}"
        raw = os.pread(self.fd, 8, 0)
        if len(raw) < 8:
            raise CmmergeError(f"{bad}: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise CmmergeError(f"{bad}: header of {n} bytes in a {size}-byte file (corrupt)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
            metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
            entries = {}
            for key, info in header.items():
                dtype, shape = DTYPES.get(info["dtype"]), tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
                if dtype is None:
                    raise CmmergeError(f"{bad}: unsupported dtype {info['dtype']} for {key!r}")
                if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                    raise CmmergeError(f"{bad}: offsets of {key!r} do not match its shape")
                entries[key] = (dtype, shape, begin, end)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CmmergeError(f"{bad}: corrupt header ({exc!r})") from None
        need = 8 + n + max((e[3] for e in entries.values()), default=0)
        if need > size:
            raise CmmergeError(f"{bad}: truncated ({size} bytes, the header needs {need})")
        entries = dict(sorted(entries.items(), key=lambda kv: kv[1][2]))
        return entries, metadata, 8 + n

    def read(
        self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``key`` as a 1-D array of its storage dtype: a new
        one, or ``out`` (contiguous, of that dtype and length) filled."""
        dtype, shape, begin, _ = self.entries[key]
        stop = math.prod(shape) if stop is None else stop
        if out is None:
            out = np.empty(max(stop - start, 0), dtype=dtype.storage)
        self._pread(key, _bytes_view(out), self.data_start + begin + start * dtype.itemsize)
        return out

    def read_blocks(
        self, key: str, start: int, block: int, every: int, count: int, out: np.ndarray
    ) -> np.ndarray:
        """Blocks of ``block`` flat elements of ``key`` at ``start``, ``start + every * block``,
        ... (``count`` of them), one after another into ``out`` (contiguous, its dtype)."""
        dtype, _, begin, _ = self.entries[key]
        view, size = _bytes_view(out), block * dtype.itemsize
        first = self.data_start + begin + start * dtype.itemsize
        for b in range(count):
            self._pread(key, view[b * size : (b + 1) * size], first + b * every * size)
        return out

    def _map(self) -> np.ndarray:
        """The whole file as a uint8 array over a private mapping (made on first use)."""
        if self._bytes is None:
            with self._map_lock:
                if self._bytes is None:
                    # private: a stray write would change this process's copy, never the file
                    self._mapped = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_COPY)
                    self._bytes = np.frombuffer(self._mapped, dtype=np.uint8)
        return self._bytes

    def _span(self, key: str, start: int, stop: int | None) -> tuple[DType, int, int]:
        dtype, shape, begin, _ = self.entries[key]
        stop = math.prod(shape) if stop is None else stop
        first = self.data_start + begin + start * dtype.itemsize
        return dtype, first, first + max(stop - start, 0) * dtype.itemsize

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``key``, a view of the mapped file (not to be
        written); :meth:`release` them when done."""
        dtype, first, end = self._span(key, start, stop)
        if first == end:
            return np.empty(0, dtype=dtype.storage)
        return self._map()[first:end].view(dtype.storage)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of a :meth:`view` from this process's memory (they stay cached by the
        kernel; a later view maps them again)."""
        _, first, end = self._span(key, start, stop)
        if self._mapped is None or first == end:
            return
        lo = first - first % mmap.PAGESIZE
        self._mapped.madvise(mmap.MADV_DONTNEED, lo, end - lo)

    def _pread(self, key: str, view, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got <= 0:
                raise CmmergeError(f"cannot read tensor {key!r} from {self.path}: file shrank")
            done += got

    def close(self) -> None:
        self._bytes = None
        if self._mapped is not None:
            try:
                self._mapped.close()
            except BufferError:  # a view is still held: unmapped when it goes
                pass
            self._mapped = None
        os.close(self.fd)


def _pickle_fault(exc: Exception) -> str:
    """What is wrong with a pickle torch refused to load, without torch's advice to load it
    with ``weights_only=False`` (which would run its code: cmmerge never does)."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:
        return (
            f"it holds objects other than tensors ({found.group(1)}), which cmmerge never "
            "unpickles; re-save its tensors as safetensors"
        )
    return f"not a readable PyTorch state dict ({type(exc).__name__})"


class _PickleFile:
    """A pickle ``.bin`` state dict, loaded (``weights_only``, mmapped) only when allowed."""

    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            fault = _pickle_fault(exc)
            raise CmmergeError(f"cannot read pickle checkpoint {path}: {fault}") from None
        if not isinstance(state, dict):
            raise CmmergeError(f"cannot read pickle checkpoint {path}: not a state dict of tensors")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.entries = {k: (as_dtype(v.dtype), tuple(v.shape), 0, 0) for k, v in tensors.items()}
        self.tensors = {k: from_torch(v)[0] for k, v in tensors.items()}
        self.metadata: dict[str, str] = {}

    def read(
        self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        part = self.tensors[key][start:stop]
        if out is None:
            return part.copy()
        out[...] = part
        return out

    def read_blocks(
        self, key: str, start: int, block: int, every: int, count: int, out: np.ndarray
    ) -> np.ndarray:
        flat = self.tensors[key][start : start + count * every * block]
        rows = flat[: (flat.size // block) * block].reshape(-1, block)[::every][:count]
        out.reshape(-1, block)[...] = rows
        return out

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.tensors[key][start:stop]

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.tensors = {}


class CheckpointReader:
    """Read tensors by name from an HF model folder (single or sharded) or a .safetensors file.

    Pickle checkpoints (``pytorch_model.bin``, its index, or a ``.bin``/``.pt`` file) are
    refused unless ``allow_pickle`` (unpickling can run code; they are also loaded whole).
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        if self.path.is_file():
            files = [self.path]
        elif self.path.is_dir():
            files = self._files_in_folder()
        else:
            raise CmmergeError(f"checkpoint not found: {self.path}")
        self._files: list[_SafetensorsFile | _PickleFile] = []
        self._file_of: dict[str, _SafetensorsFile | _PickleFile] = {}
        try:
            for file in files:
                self._files.append(self._open(file))
                for key in self._files[-1].entries:
                    self._file_of.setdefault(key, self._files[-1])
        except CmmergeError:
            self.close()
            raise
        self.metadata: dict[str, str] = dict(self._files[0].metadata)

    def _open(self, file: Path) -> _SafetensorsFile | _PickleFile:
        if file.suffix in (".bin", ".pt", ".pth"):
            if not self.allow_pickle:
                raise CmmergeError(
                    f"{file} is a pickle checkpoint: refused because unpickling can "
                    "run code (allow_pickle=true loads it)"
                )
            return _PickleFile(file)
        return _SafetensorsFile(file)

    def _files_in_folder(self) -> list[Path]:
        for single, index in ((SINGLE_FILE, INDEX_FILE), (PICKLE_FILE, PICKLE_INDEX)):
            single, index = self.path / single, self.path / index
            if single.is_file():
                return [single]
            if index.is_file():
                break
        else:
            hint = ""
            if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
                hint = " (found only .bin/.pt weights: re-save with safe_serialization=True)"
            raise CmmergeError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CmmergeError(f"corrupt index {index}: {exc!r}") from None
        files = [self.path / name for name in dict.fromkeys(sorted(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CmmergeError(f"shard(s) listed in {index} are missing: {', '.join(missing)}")
        return files

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by data offset within a shard)."""
        return list(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def _entry(self, key: str) -> tuple:
        try:
            return self._file_of[key].entries[key]
        except KeyError:
            raise CmmergeError(f"tensor {key!r} not found in {self.path}") from None

    def get(self, key: str) -> Any:
        """Load one tensor as a torch tensor (CPU, stored dtype, shaped; imports torch): for
        callers that work in torch. The merge works on :meth:`read`'s numpy arrays."""
        return to_torch(self.read(key), self.dtype(key)).view(self.shape(key))

    def read(
        self, key: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``key`` (a new 1-D array of its storage dtype, or
        ``out``: contiguous, of that dtype, filled); thread-safe."""
        self._entry(key)
        return self._file_of[key].read(key, start, stop, out)

    def read_float32(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``key`` as a new float32 array."""
        raw, dtype = self.read(key, start, stop), self.dtype(key)
        return raw if dtype == F32 else to_float32(raw, dtype, np.empty(raw.size, np.float32))

    def view(self, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``key`` without a copy (a view of the mapped file:
        read it, never write it), to be given back with :meth:`release`; thread-safe."""
        self._entry(key)
        return self._file_of[key].view(key, start, stop)

    def release(self, key: str, start: int = 0, stop: int | None = None) -> None:
        """Drop a :meth:`view`'s pages from this process's resident memory."""
        self._file_of[key].release(key, start, stop)

    def read_blocks(
        self, key: str, start: int, block: int, every: int, count: int, out: np.ndarray
    ) -> np.ndarray:
        """``count`` blocks of ``block`` flat elements of ``key``, one every ``every`` blocks
        from element ``start``, packed into ``out`` (of the stored dtype): a sample read
        without reading what lies between."""
        self._entry(key)
        return self._file_of[key].read_blocks(key, start, block, every, count, out)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, from the header."""
        return self._entry(key)[1]

    def dtype(self, key: str) -> DType:
        """Stored dtype of a tensor, from the header."""
        return self._entry(key)[0]

    def numel(self, key: str) -> int:
        return math.prod(self.shape(key))

    def close(self) -> None:
        """Close the files."""
        for file in getattr(self, "_files", []):
            file.close()
        self._files = []

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _str_metadata(metadata: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


class StreamingFileWriter:
    """Write one ``.safetensors`` file from a declared layout, holding none of the tensors.

    ``layout`` (name -> (dtype, shape)) fixes the header up front; widest dtypes come first so
    every tensor is aligned. ``write`` takes a whole tensor or a flat chunk at element offset
    ``start``, in any order and from any thread. ``close()`` checks every element came, then
    renames the temp file into place; ``abort()`` deletes it.
    """

    def __init__(
        self, path: str | os.PathLike, layout: Layout, metadata: dict[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self._layout = {k: (as_dtype(d), tuple(s)) for k, (d, s) in layout.items()}
        header: dict[str, object] = {"__metadata__": _str_metadata(metadata)} if metadata else {}
        self._offsets: dict[str, int] = {}
        start = 0
        for key in sorted(self._layout, key=lambda k: -self._layout[k][0].itemsize):
            dtype, shape = self._layout[key]
            end = start + math.prod(shape) * dtype.itemsize
            header[key] = {
                "dtype": dtype.code,
                "shape": list(shape),
                "data_offsets": [start, end],
            }
            self._offsets[key], start = start, end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.nbytes = self._data_start + start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        _reserve(self._fd, self.nbytes, self.path)
        self._written: dict[str, int] = dict.fromkeys(self._layout, 0)
        self._lock = threading.Lock()

    def write(self, key: str, values: Any, start: int = 0, dtype: DType | None = None) -> None:
        """Write ``values`` (a whole declared tensor, or flat elements from ``start``): a numpy
        array of the declared dtype's storage (``dtype``, when given, names the dtype it holds)
        or a torch tensor."""
        if key not in self._layout:
            raise CmmergeError(f"tensor {key!r} is not in the declared layout of {self.path}")
        declared, shape = self._layout[key]
        if isinstance(values, np.ndarray):
            array, held = values, dtype or (declared if values.dtype == declared.storage else None)
        else:
            array, held = from_torch(values)
        whole = start == 0 and tuple(values.shape) == tuple(shape)
        if held != declared or not (whole or start + array.size <= math.prod(shape)):
            got = f"{held or array.dtype} {tuple(values.shape)} at {start}"
            raise CmmergeError(f"tensor {key!r}: got {got}, declared {declared} {tuple(shape)}")
        data = _bytes_view(np.ascontiguousarray(array))
        offset, done = self._data_start + self._offsets[key] + start * declared.itemsize, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        with self._lock:
            self._written[key] += array.size

    def close(self) -> Path:
        """Check completeness, then move the file into place; returns its path."""
        missing = [k for k, (_, s) in self._layout.items() if self._written[k] != math.prod(s)]
        if missing:
            self.abort()
            raise CmmergeError(f"{len(missing)} declared tensors not fully written to {self.path}")
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temp file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._fd is not None:
            self.close()


def plan_shards(layout: Layout, max_shard_size: int) -> list[list[str]]:
    """Split ``layout`` (in order) into shards of at most ``max_shard_size`` bytes each
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, (dtype, shape) in layout.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


class ShardedWriter:
    """Write a declared layout as HF-layout shards (``model.safetensors``, or
    ``model-0000i-of-0000N.safetensors`` + index), chunk by chunk, from any thread.

    ``close()`` removes old weight files in ``out_dir`` and renames the shards into place;
    leaving a ``with`` block by an exception deletes the temp files and writes nothing final.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        layout: Layout,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if int(max_shard_size) <= 0:
            raise CmmergeError(f"max_shard_size must be positive, got {max_shard_size}")
        self.layout = {k: (as_dtype(d), tuple(s)) for k, (d, s) in layout.items()}
        shards = plan_shards(self.layout, int(max_shard_size))
        n = len(shards)
        names = (
            [SINGLE_FILE]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        meta = metadata if metadata is not None else {"format": "pt"}
        self._writers: list[StreamingFileWriter] = []
        self._writer_of: dict[str, StreamingFileWriter] = {}
        self.weight_map: dict[str, str] = {}
        try:
            for name, keys in zip(names, shards, strict=True):
                writer = StreamingFileWriter(
                    self.out_dir / name, {k: self.layout[k] for k in keys}, meta
                )
                self._writers.append(writer)
                for key in keys:
                    self._writer_of[key] = writer
                    self.weight_map[key] = name
        except BaseException:
            self.abort()
            raise
        self._closed = False

    def write(self, key: str, values: Any, start: int = 0, dtype: DType | None = None) -> None:
        """Write a whole tensor, or flat elements from ``start``, of declared tensor ``key``
        (see :meth:`StreamingFileWriter.write`)."""
        if key not in self._writer_of:
            raise CmmergeError(f"tensor {key!r} is not in the declared layout of {self.out_dir}")
        self._writer_of[key].write(key, values, start, dtype)

    def close(self) -> list[Path]:
        """Finish writing; returns the final files (shards, then the index if any)."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        self._closed = True
        old = [*self.out_dir.glob("model-*-of-*.safetensors"), self.out_dir / INDEX_FILE]
        for path in [self.out_dir / SINGLE_FILE, *old]:
            path.unlink(missing_ok=True)
        try:
            files = [w.close() for w in self._writers]
        except BaseException:
            self.abort()
            raise
        if len(files) == 1:
            return files
        total = sum(math.prod(s) * d.itemsize for d, s in self.layout.values())
        params = sum(math.prod(s) for _, s in self.layout.values())
        index = {
            "metadata": {"total_size": total, "total_parameters": params},
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*files, self.out_dir / INDEX_FILE]

    def abort(self) -> None:
        """Delete the temp files without writing final ones."""
        self._closed = True
        for writer in self._writers:
            writer.abort()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
