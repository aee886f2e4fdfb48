"""Streaming safetensors I/O: nothing here loads a whole model.

``CheckpointReader`` hands out tensors by name from mmapped files; ``ShardedWriter`` holds at
most one shard; ``StreamingFileWriter`` writes one file tensor by tensor from a declared layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmmerge.errors import CmmergeError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_size`` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointReader:
    """Read tensors by name from an HF model folder (single or sharded) or a .safetensors file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        if self.path.is_file():
            files = [self.path]
        elif self.path.is_dir():
            files = self._files_in_folder()
        else:
            raise CmmergeError(f"checkpoint not found: {self.path}")
        for file in files:
            for key in self._handle(file).offset_keys():
                self._file_of.setdefault(key, file)
        self.metadata: dict[str, str] = dict(self._handle(files[0]).metadata() or {})

    def _files_in_folder(self) -> list[Path]:
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.is_file():
            return [single]
        if not index.is_file():
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

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # SafetensorError, OSError
                raise CmmergeError(f"cannot read safetensors file {file}: {exc}") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by data offset within a shard)."""
        return list(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def _file(self, key: str) -> Path:
        try:
            return self._file_of[key]
        except KeyError:
            raise CmmergeError(f"tensor {key!r} not found in {self.path}") from None

    def get(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype)."""
        file = self._file(key)
        try:
            return self._handle(file).get_tensor(key)
        except Exception as exc:
            raise CmmergeError(f"cannot read tensor {key!r} from {file}: {exc}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the header only."""
        return tuple(self._handle(self._file(key)).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """Torch dtype of a tensor, read from the header only."""
        name = self._handle(self._file(key)).get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise CmmergeError(f"unsupported dtype {name} for {key!r} in {self.path}")
        return _DTYPES[name]

    def close(self) -> None:
        """Drop the file handles."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _str_metadata(metadata: dict | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


class ShardedWriter:
    """Write tensors into HF-layout safetensors shards, flushing each temp shard as it fills.

    ``close()`` removes old weight files in ``out_dir``, then renames the shards to
    ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + the index json.
    Leaving a ``with`` block by an exception deletes the temp shards and writes nothing final.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = int(max_shard_size)
        self.metadata = _str_metadata(metadata if metadata is not None else {"format": "pt"})
        self._buffer: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()
        self._shards: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self._buffer_bytes = self._total_size = self._total_params = 0
        self._closed = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Buffer ``tensor`` under ``key``; flushes the buffer first if it would overflow."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if key in self._seen:
            raise CmmergeError(f"tensor {key!r} written twice to {self.out_dir}")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in self._storages:  # shared memory: copy
            tensor = tensor.clone()
        size = tensor.nbytes
        if self._buffer and self._buffer_bytes + size > self.max_shard_size:
            self.flush()
        self._seen.add(key)
        self._buffer[key] = tensor
        self._storages.add(tensor.untyped_storage().data_ptr())
        self._buffer_bytes += size
        self._total_size += size
        self._total_params += tensor.numel()

    def flush(self, force: bool = False) -> None:
        """Write the buffered tensors to a temp shard file (an empty one only if ``force``)."""
        if not (self._buffer or force):
            return
        tmp = self.out_dir / f".tmp-{os.getpid()}-shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, str(tmp), metadata=self.metadata)
        self._shards.append((tmp, list(self._buffer)))
        self._buffer, self._buffer_bytes, self._storages = {}, 0, set()

    def close(self) -> list[Path]:
        """Finish writing; returns the final files (shards, then the index if any)."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        self.flush(force=not self._shards)  # an empty model still gets a valid file
        self._closed = True
        old = [*self.out_dir.glob("model-*-of-*.safetensors"), self.out_dir / INDEX_FILE]
        for path in [self.out_dir / SINGLE_FILE, *old]:
            path.unlink(missing_ok=True)
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.out_dir / SINGLE_FILE)
            return [self.out_dir / SINGLE_FILE]
        written, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._shards, start=1):
            written.append(self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors")
            os.replace(tmp, written[-1])
            weight_map.update(dict.fromkeys(keys, written[-1].name))
        index = {
            "metadata": {"total_size": self._total_size, "total_parameters": self._total_params},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*written, self.out_dir / INDEX_FILE]

    def abort(self) -> None:
        """Delete temp shards without writing final files."""
        self._closed = True
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


class StreamingFileWriter:
    """Write one ``.safetensors`` file tensor by tensor (any order), holding none of them.

    ``layout`` (name -> (dtype, shape)) fixes the header up front; widest dtypes come first so
    every tensor is aligned. ``close()`` checks all came, then renames the temp file into place.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self._layout = dict(layout)
        header: dict[str, object] = {"__metadata__": _str_metadata(metadata)} if metadata else {}
        self._offsets: dict[str, int] = {}
        start = 0
        for key in sorted(self._layout, key=lambda k: -self._layout[k][0].itemsize):
            dtype, shape = self._layout[key]
            end = start + math.prod(shape) * dtype.itemsize
            name = _DTYPE_NAMES[dtype]
            header[key] = {"dtype": name, "shape": list(shape), "data_offsets": [start, end]}
            self._offsets[key], start = start, end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{os.getpid()}-{self.path.name}")
        self._fh = open(self._tmp, "wb")  # closed in close() or abort()
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self._data_start + start)
        self._written: set[str] = set()

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the data of one declared tensor (any order)."""
        if key not in self._layout:
            raise CmmergeError(f"tensor {key!r} is not in the declared layout of {self.path}")
        dtype, shape = self._layout[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            got = f"{tensor.dtype} {tuple(tensor.shape)}"
            raise CmmergeError(f"tensor {key!r}: got {got}, declared {dtype} {tuple(shape)}")
        self._fh.seek(self._data_start + self._offsets[key])
        self._fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._written.add(key)

    def close(self) -> Path:
        """Check completeness, then move the file into place; returns its path."""
        missing = [k for k in self._layout if k not in self._written]
        if missing:
            self.abort()
            raise CmmergeError(f"{len(missing)} declared tensors never written to {self.path}")
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temp file."""
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> StreamingFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._fh.closed:
            self.close()
