"""Streaming merge: ``theta = base + lambda * combine(tau_1..tau_n)``, chunk by chunk, on all cores.

Every tensor is cut into flat chunks of ``CHUNK`` elements (:mod:`cmmerge.merging.threads`). A
pool of ``threads`` workers (numpy, single-threaded inside each; no torch, whose import alone
would take about a second) reads the chunk of the base and of every source, computes in float32 and
writes the result straight to its place in the output shards; the main thread only schedules,
keeping at most two chunks per worker in flight. Magnitude trimming finds its exact threshold
with the counting selection of ``select`` over the chunks of a tensor (``trim_scope=tensor``,
mergekit's rule) or of the whole model (``trim_scope=model``, the original TIES code's rule). A
trimmed tensor of up to ``CACHED_TRIM`` elements is read once, its float32 deltas serving the
selection and the merge; a larger one (an embedding) is recomputed chunk by chunk for the
counting pass and the merge, its sample read block by block. Every thread reads, computes and
converts in buffers of its own that it reuses from chunk to chunk (no fresh pages per chunk), so
memory stays near ``threads * (sources + 2)`` times the largest such tensor in float32 plus the
interpreter, whatever the model size.

What merges is planned in ``plan``: a standalone merge of models merges the whole model (every
floating tensor the base and all sources have, heads included, as mergekit); the in-run merge of
a task vector (backbone only) copies the base's heads, e.g. the MLM head that fine-tuning
drops. Tensors only the base has (a pooler, an NSP head) are copied unchanged and listed.
Floating tensors are written in float32 unless ``dtype`` asks otherwise, whatever the inputs'
dtype (a bfloat16 base would lose the small ``lambda * tau``).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from cmmerge.errors import CmmergeError
from cmmerge.io.checkpoint import DEFAULT_MAX_SHARD_SIZE, CheckpointReader, ShardedWriter
from cmmerge.io.dtypes import F32, DType, as_dtype, from_float32, to_float32
from cmmerge.merging.methods import (
    MergeMethod,
    apply_delta,
    dare_keep,
    get_method,
    resolve_params,
)
from cmmerge.merging.plan import Item, PathLike, Source, open_sources, plan_merge
from cmmerge.merging.select import (
    SAMPLE_BLOCK,
    Threshold,
    keep_count,
    magnitude_bits,
    sample_blocks,
    thresholds_over,
    trim_,
)
from cmmerge.merging.threads import chunk_ranges, default_threads

log = logging.getLogger("cmmerge")

# Per-tensor trims of tensors up to this many elements run as one task that keeps its float32
# base and deltas between the selection passes and the merge (128 MiB each per worker). Larger
# ones (an embedding) are trimmed chunk-parallel, their deltas recomputed chunk by chunk for
# the counting pass and the merge (the selection's sample reads only the blocks it takes).
CACHED_TRIM = 32 * 1024 * 1024


def _sums_finite(x: np.ndarray) -> bool:
    """Whether the float32 sum of ``x`` is finite: one cheap pass, false for any NaN or Inf
    (and for a sum that overflows, which the caller then looks at entry by entry)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(x.sum(dtype=np.float32)))


class _Scheduler:
    """A thread pool with a bound on queued work and the first error kept."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="cmmerge")
        self._slots = threading.BoundedSemaphore(2 * threads)
        self._futures: list[Future] = []
        self.failed = threading.Event()

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        if self.failed.is_set():
            return
        self._slots.acquire()

        def run() -> None:
            try:
                if not self.failed.is_set():
                    fn(*args)
            except BaseException:
                self.failed.set()
                raise
            finally:
                self._slots.release()

        self._futures.append(self.pool.submit(run))

    def map(self, fn: Callable, items) -> list:
        return list(self.pool.map(fn, items))

    def wait(self) -> None:
        """Wait for everything; re-raise the first error."""
        for future in self._futures:
            exc = future.exception()
            if exc is not None:
                raise exc
        self._futures = []

    def close(self) -> None:
        self.failed.set()
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Workspace(threading.local):
    """Each thread's buffers, reused from chunk to chunk and tensor to tensor (each grows to the
    largest size asked): the merge reads, computes and converts into memory it already has,
    instead of asking for (and having the kernel zero and map) fresh pages for every chunk."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, n: int, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """``n`` elements of this thread's buffer ``name`` (contents left over)."""
        key = (name, np.dtype(dtype))
        buf = self.bufs.get(key)
        if buf is None or buf.size < n:
            self.bufs.pop(key, None)  # freed before the larger one is made
            buf = self.bufs[key] = np.empty(n, dtype=key[1])
        return buf[:n]


class _Merger:
    """Runs one planned merge (see the module docstring)."""

    def __init__(
        self,
        base: CheckpointReader,
        sources: list[Source],
        method: MergeMethod,
        params: dict,
        weights: list[float],
        scale: float,
        writer: ShardedWriter,
        allow_nonfinite: bool,
    ) -> None:
        self.base, self.sources, self.method = base, sources, method
        self.weights, self.scale, self.writer = weights, scale, writer
        self.normalize, self.sign = bool(params["normalize"]), str(params.get("sign", "sum"))
        self.density = float(params.get("density", 1.0))
        self.seed, self.scope = int(params.get("seed", 0)), str(params.get("trim_scope", "tensor"))
        self.allow_nonfinite = allow_nonfinite
        self.trims = method.trim is not None and self.density < 1
        self.ws = _Workspace()  # freed with the merger

    def _read_f32(
        self, reader: CheckpointReader, key: str, start: int, stop: int, out: np.ndarray
    ) -> np.ndarray:
        """Flat elements ``[start, stop)`` of ``reader[key]`` in float32, into ``out``."""
        dtype = reader.dtype(key)
        if dtype == F32:
            return reader.read(key, start, stop, out)
        raw = reader.read(key, start, stop, self.ws.get("raw", stop - start, dtype.storage))
        return to_float32(raw, dtype, out)

    def deltas(
        self,
        item: Item,
        start: int,
        stop: int,
        base: np.ndarray | None = None,
        out: list[np.ndarray] | None = None,
        keep_base: bool = True,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(base chunk in float32, one float32 delta chunk per source), written into ``base``
        and ``out`` when given, else into this thread's chunk buffers (valid until its next
        chunk). Without ``base``, a float32 base chunk is a view of the mapped file, which
        :meth:`release_base` gives back (at once unless ``keep_base``); float32 sources are
        subtracted straight from their mapped files (half the cost of reading them)."""
        n = stop - start
        if out is None:
            out = [self.ws.get(f"delta{i}", n) for i in range(len(self.sources))]
        if base is None:
            base = self._view_f32(self.base, item.key, start, stop, "base")
        else:
            self._read_f32(self.base, item.key, start, stop, base)
        for s, key, d in zip(self.sources, item.src_keys, out, strict=True):
            if key is None:  # all zero in this task vector (not stored)
                d.fill(0)
                continue
            if s.reader.dtype(key) == F32:  # the mapped file itself, no copy
                x = s.reader.view(key, start, stop)
                if s.is_model:
                    np.subtract(x, base, out=d)
                else:
                    np.copyto(d, x)
                s.reader.release(key, start, stop)
            elif s.is_model:
                np.subtract(self._read_f32(s.reader, key, start, stop, d), base, out=d)
            else:
                self._read_f32(s.reader, key, start, stop, d)
        if not keep_base:
            self.release_base(item, start, stop)
        return base, out

    def _view_f32(self, reader: CheckpointReader, key: str, start: int, stop: int, name: str):
        """Flat elements ``[start, stop)`` of ``reader[key]`` in float32: the mapped file itself
        when it is stored in float32, else read and converted into the buffer ``name`` (a
        mapped bfloat16 file converted in place measured slower and larger on Llama-3.2-1B)."""
        if reader.dtype(key) == F32:
            return reader.view(key, start, stop)
        return self._read_f32(reader, key, start, stop, self.ws.get(name, stop - start))

    def release_base(self, item: Item, start: int, stop: int) -> None:
        """Give back the base's mapped pages of a chunk read by :meth:`deltas`."""
        self.base.release(item.key, start, stop)

    def sample(self, item: Item, start: int, stop: int, every: int) -> list[np.ndarray]:
        """The blocks ``select`` samples from the deltas of chunk ``[start, stop)`` (one block of
        ``SAMPLE_BLOCK`` in ``every``), read and subtracted alone: the rest is not read."""
        count = sample_blocks(stop - start, every)
        n = count * SAMPLE_BLOCK

        def blocks(reader: CheckpointReader, key: str, name: str) -> np.ndarray:
            dtype = reader.dtype(key)
            raw = reader.read_blocks(
                key, start, SAMPLE_BLOCK, every, count, self.ws.get(f"s{name}", n, dtype.storage)
            )
            return raw if dtype == F32 else to_float32(raw, dtype, self.ws.get(f"f{name}", n))

        base = blocks(self.base, item.key, "base")
        out = []
        for i, (s, key) in enumerate(zip(self.sources, item.src_keys, strict=True)):
            if key is None:  # all zero in this task vector (not stored)
                out.append(np.zeros(n, np.int32))
                continue
            x = blocks(s.reader, key, str(i))
            out.append(magnitude_bits(x - base if s.is_model else x))
        return out

    def _trim(
        self,
        item: Item,
        start: int,
        deltas: list[np.ndarray],
        thresholds: list[Threshold | None] | None,
        chunk: int,
    ) -> None:
        if not self.trims:
            return
        for i, d in enumerate(deltas):
            if self.method.trim == "magnitude":
                if thresholds is not None:
                    trim_(d, thresholds[i], chunk)
            else:  # DARE: seeded by (seed, tensor, source, position), whatever the threads
                tag = f"{self.seed}/{item.key}/{i}/{start}".encode()
                seed = int(hashlib.sha256(tag).hexdigest()[:15], 16)
                d *= dare_keep(d.shape, self.density, seed)
                d *= np.float32(1.0 / self.density)

    def thresholds(
        self,
        pieces: list[tuple[Item, int, int]],
        map_fn: Callable = map,
        cached: list[np.ndarray] | None = None,
    ) -> list[Threshold | None]:
        """Per-source magnitude thresholds over a domain of chunks: over ``cached`` deltas (one
        chunk), or recomputing each chunk's deltas per pass (a chunk's sample read alone)."""
        total = sum(stop - start for _, start, stop in pieces)
        ks = [keep_count(self.density, total)] * len(self.sources)
        if cached is not None:
            return thresholds_over(lambda c: cached, 1, ks)
        return thresholds_over(
            lambda c: self.deltas(*pieces[c], keep_base=False)[1],
            len(pieces),
            ks,
            map_fn,
            total=total,
            sample=lambda c, every: self.sample(*pieces[c], every),
        )

    def apply_tensor(self, item: Item, ranges: list[tuple[int, int]]) -> None:
        """Trim and merge a whole tensor in one task: its float32 base and deltas are read once
        into this thread's tensor buffers and serve both the selection and the merge."""
        n = item.shared
        base = self.ws.get("tensor_base", n)
        deltas = [self.ws.get(f"tensor_delta{i}", n) for i in range(len(self.sources))]
        cached = [self.deltas(item, s, e, base[s:e], [d[s:e] for d in deltas]) for s, e in ranges]
        ks = [keep_count(self.density, n)] * len(self.sources)
        thr = thresholds_over(lambda c: cached[c][1], len(ranges), ks, total=n)
        for c, (s, e) in enumerate(ranges):
            self.apply(item, s, e, thr, c, cached[c])

    def apply(
        self,
        item: Item,
        start: int,
        stop: int,
        thresholds: list[Threshold | None] | None,
        chunk: int,
        computed: tuple[np.ndarray, list[np.ndarray]] | None = None,
    ) -> None:
        """Merge flat elements ``[start, stop)`` of ``item`` and write them."""
        base, deltas = computed or self.deltas(item, start, stop)
        mapped = computed is None
        if thresholds is None and self.trims and self.method.trim == "magnitude":
            thresholds, chunk = self.thresholds([(item, start, stop)], cached=deltas), 0
        self._trim(item, start, deltas, thresholds, chunk)
        combined = self.method.combine(
            deltas, self.weights, normalize=self.normalize, sign=self.sign
        )
        out = apply_delta(base, combined, self.scale)
        if (
            not self.allow_nonfinite
            and not _sums_finite(out)  # cheap: NaN/Inf (or overflow) shows here
            and not bool(np.isfinite(out).all())
        ):
            self._blame(item, start, stop)
        self._write(item, out, start, finite=not self.allow_nonfinite)
        if mapped:
            self.release_base(item, start, stop)

    def _write(self, item: Item, values: np.ndarray, start: int, finite: bool = False) -> None:
        """Write float32 ``values`` in the output dtype, checked after the cast: a value beyond
        what float16 holds (65504) becomes Inf there (bfloat16 has float32's range). ``finite``:
        ``values`` were checked to hold no NaN or Inf."""
        if item.dtype == F32:
            self.writer.write(item.key, values, start, F32)
            return
        n = values.size
        written = from_float32(
            values,
            item.dtype,
            self.ws.get("out", n, item.dtype.storage),
            self.ws.get("scratch", n, np.uint32),
            finite,
        )
        if (
            written.dtype == np.float16
            and not self.allow_nonfinite
            and not _sums_finite(written)  # cheap first look
            and not bool(np.isfinite(written).all())
            and bool(np.isfinite(values).all())
        ):
            raise CmmergeError(
                f"tensor {item.key!r} holds values beyond the range of {item.dtype} "
                f"(|x| > {float(np.finfo(np.float16).max):g}), which become Inf when written: "
                "lower lambda or write float32 (dtype=float32); allow_nonfinite=true writes "
                "them anyway"
            )
        self.writer.write(item.key, written, start, item.dtype)

    def _blame(self, item: Item, start: int, stop: int) -> None:
        readers = [(self.base, item.key, "the base")] + [
            (s.reader, k, s.label)
            for s, k in zip(self.sources, item.src_keys, strict=True)
            if k is not None
        ]
        where = "the merge (overflow)"
        for reader, key, label in readers:
            if not bool(np.isfinite(reader.read_float32(key, start, stop)).all()):
                where = label
                break
        raise CmmergeError(
            f"non-finite values (NaN or Inf) in tensor {item.key!r} of {where} "
            "(allow_nonfinite=true merges anyway)"
        )

    def copy(
        self, reader: CheckpointReader, key: str, item: Item, start: int, stop: int, offset: int
    ) -> None:
        """Copy flat elements ``[start, stop)`` of ``reader[key]`` to ``item`` at ``offset``
        (converted through float32 when the output dtype differs)."""
        dtype = reader.dtype(key)
        if dtype == item.dtype:
            x = reader.read(key, start, stop, self.ws.get("raw", stop - start, dtype.storage))
            self.writer.write(item.key, x, offset, dtype)
            return
        values = self._read_f32(reader, key, start, stop, self.ws.get("f32", stop - start))
        self._write(item, values, offset)

    def run(self, items: list[Item], threads: int) -> None:
        sched = _Scheduler(threads)
        collecting = gc.isenabled()
        gc.disable()  # the merge makes no reference cycles; collections would only cost time
        try:
            model_thr: list[Threshold | None] | None = None
            offsets: dict[str, int] = {}
            if self.trims and self.method.trim == "magnitude" and self.scope == "model":
                pieces = [
                    (it, s, e) for it in items if it.src_keys for s, e in chunk_ranges(it.shared)
                ]
                n = 0
                for it in items:
                    if it.src_keys:
                        offsets[it.key], n = n, n + len(chunk_ranges(it.shared))
                model_thr = self.thresholds(pieces, sched.map)
            for item in items:
                self._schedule(item, sched, model_thr, offsets.get(item.key, 0))
            sched.wait()
        finally:
            sched.close()
            if collecting:
                gc.enable()

    def _schedule(
        self, item: Item, sched: _Scheduler, model_thr: list | None, first_chunk: int
    ) -> None:
        if not item.src_keys:
            for s, e in chunk_ranges(item.shared or item.numel):
                sched.submit(self.copy, self.base, item.key, item, s, e, s)
            self._copy_new_rows(item, sched)
            return
        ranges = chunk_ranges(item.shared)
        thr = model_thr
        per_tensor_trim = thr is None and self.trims and self.method.trim == "magnitude"
        if per_tensor_trim and len(ranges) > 1 and item.shared <= CACHED_TRIM:
            sched.submit(self.apply_tensor, item, ranges)
            ranges = []
        elif per_tensor_trim and len(ranges) > 1:
            thr = self.thresholds([(item, s, e) for s, e in ranges], sched.map)
        for c, (s, e) in enumerate(ranges):
            sched.submit(self.apply, item, s, e, thr, first_chunk + c if thr else 0)
        self._copy_new_rows(item, sched)

    def _copy_new_rows(self, item: Item, sched: _Scheduler) -> None:
        """The rows of a grown vocabulary, from the source that grew it."""
        if item.grown_from is None:
            return
        reader = self.sources[item.grown_from].reader
        for s, e in chunk_ranges(item.numel - item.shared):
            start, stop = item.shared + s, item.shared + e
            sched.submit(self.copy, reader, item.grown_key, item, start, stop, start)


def check_output_dir(out_dir: PathLike, inputs: list[tuple[str, PathLike]]) -> None:
    """Refuse an output folder that is, contains or lies inside an input (the base, a source):
    writing there would destroy what is being read.

    Args:
        out_dir: The folder a merge writes.
        inputs: ``[(what, path), ...]``, e.g. ``[("the base", B), ("a source", A)]``.
    """
    out = Path(out_dir).expanduser().resolve()
    for what, path in inputs:
        inp = Path(path).expanduser().resolve()
        how = (
            "is" if out == inp
            else "is inside" if out.is_relative_to(inp)
            else "contains" if inp.is_relative_to(out)
            else None
        )  # fmt: skip
        if how:
            raise CmmergeError(
                f"output folder {out_dir} {how} {what} ({path}): writing it would destroy the "
                "merge's input; choose another output"
            )


def _merge(
    base_dir: PathLike,
    source_paths: list[PathLike],
    is_model: bool,
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    dtype: DType | str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    allow_nonfinite: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    grow_vocab: bool = True,
    **params: object,
) -> dict:
    merge_method = get_method(method)
    resolved = resolve_params(method, **params)
    if not source_paths:
        raise CmmergeError("nothing to merge: no task vectors or models given")
    if len(weights) != len(source_paths):
        raise CmmergeError(f"{len(source_paths)} sources to merge but {len(weights)} weights")
    check_output_dir(out_dir, [("the base", base_dir), *(("a source", p) for p in source_paths)])
    weights = [float(w) for w in weights]
    with ExitStack() as stack:
        base = stack.enter_context(CheckpointReader(base_dir, allow_pickle=allow_pickle))
        sources = open_sources(list(source_paths), is_model, base_dir, allow_pickle)
        for s in sources:
            stack.enter_context(s.reader)
        items, info = plan_merge(base, base_dir, sources, as_dtype(dtype) if dtype else None)
        if info["grown"] and not grow_vocab:
            raise _grown_refused(items, info["grown"], sources, base, str(base_dir))
        layout = {it.key: (it.dtype, it.shape) for it in items}
        writer = stack.enter_context(ShardedWriter(out_dir, layout, max_shard_size))
        merger = _Merger(
            base, sources, merge_method, resolved, weights, scale, writer, allow_nonfinite
        )
        merger.run(items, threads or default_threads())
        files = writer.close()
    n_merged = sum(1 for it in items if it.src_keys)
    copied = info["base_only"] + info["not_in_every_source"] + info["heads_copied"]
    if copied:
        log.info("copied from the base unchanged (not in every source): %s", ", ".join(copied))
    return {
        "n_merged": n_merged,
        "n_copied": len(items) - n_merged,
        **info,
        "params": resolved,
        "files": [str(f) for f in files],
    }


def _grown_refused(
    items: list, grown: dict, sources: list, base: CheckpointReader, base_dir: str
) -> CmmergeError:
    """The one line refusing a source with more vocabulary rows than the base."""
    key, rows = next(iter(grown.items()))
    item = next(it for it in items if it.key == key)
    label = sources[item.grown_from].label if item.grown_from is not None else "a source"
    return CmmergeError(
        f"{label} has a larger vocabulary than the base ({rows} rows of {key!r}, "
        f"{base.shape(key)[0]} in {base_dir}): its extra tokens have no rows in the base; "
        "grow_vocab=true merges anyway (the extra rows and the tokenizer come from that source)"
    )


def merge_into_base(
    base_dir: PathLike,
    task_vector_files: list[PathLike],
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    **options: object,
) -> dict:
    """Write ``base + scale * combine(method, [tau_1..tau_n], weights)`` to ``out_dir``.

    Base tensors whose backbone name is in the task vectors are merged (float32 math, written
    in float32 or ``dtype``). Task vectors hold backbone tensors only (``extract``), so the
    base's heads (an MLM head, an untied ``lm_head``: listed in ``heads_copied``) and what the
    tuned model did not have (a pooler, an NSP head: ``base_only``) are copied from the base
    unchanged: the in-run merge of tau_cpt keeps the base's MLM head, which fine-tuning drops.
    Non-float tensors are copied; a tied ``lm_head`` stays tied.

    Args:
        base_dir: HF model folder of the base.
        task_vector_files: Files written by ``extract_task_vector`` (keyed by backbone names).
        weights: One weight per task vector.
        method: Registry name (``task_arithmetic``/``tv``, ``ties``, ``dare_linear``, ...).
        scale: The ``lambda`` multiplying the combined delta (negative: task negation).
        out_dir: Folder for the weights (``model.safetensors`` or shards + index).
        **options: Method parameters (``density``, ``sign``, ``normalize``, ``trim_scope``,
            ``seed``; None for defaults) and ``dtype``, ``max_shard_size``,
            ``allow_nonfinite``, ``allow_pickle``, ``threads``.

    Returns:
        Stats: ``n_merged``, ``n_copied``, ``base_only`` (float tensors no source has, copied),
        ``heads_copied`` (heads of the base, which task vectors do not hold: copied),
        ``not_in_every_source`` (copied too), ``tau_keys_missing_in_base``, ``dropped_tied``
        (stored copies of tied tensors, left out), ``grown`` (key -> rows), ``dtype`` (of the
        floating tensors written), ``params`` (resolved), ``files``.

    Raises:
        CmmergeError: Bad method or parameters, unreadable or mismatched checkpoints, missing
            tensors, NaN/Inf (unless allowed). Nothing final is written then.
    """
    return _merge(
        base_dir, list(task_vector_files), False, list(weights), method, scale, out_dir, **options
    )  # type: ignore[arg-type]


def merge_models(
    base_dir: PathLike,
    model_dirs: list[PathLike],
    weights: list[float],
    method: str,
    scale: float,
    out_dir: PathLike,
    **options: object,
) -> dict:
    """Like ``merge_into_base`` with ``tau_i = model_i - base`` computed chunk by chunk, over
    the whole model: every floating tensor the base and every model have is merged, heads
    included (an untied ``lm_head``, an MLM head, ``cls.predictions.*``), as mergekit does.

    ``model_dirs`` are HF model folders (any head, same ``model_type``); backbone keys are
    aligned to the base through backbone names (so e.g. a classifier merges into an MLM base),
    head keys by their own names. A base tensor that not every model has is copied from the
    base and listed (``base_only``, ``not_in_every_source``).
    """
    return _merge(
        base_dir, list(model_dirs), True, list(weights), method, scale, out_dir, **options
    )  # type: ignore[arg-type]
