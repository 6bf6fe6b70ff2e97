"""Write a model package (see :mod:`recserve.package`) from a source of table rows: a trained
torchrec state dict (:func:`export_package`) or seeded random weights
(:func:`recserve.random_init.export_random_package`). Imports no torchrec.

Tables are written chunk by chunk of rows, never whole: each shard file gets its header
first (every shape is known from the plan), then a pool of ``threads`` converts chunks
(to the storage dtype, quantizing row-wise where asked; :mod:`kernels.quantize`) and
writes each at its byte offset, while this thread feeds the written bytes to the file's
sha256 in file order; the shard files are written concurrently, each hashed by its own
thread. At most about ``2 * threads`` chunks are in flight, so peak memory stays near that
many chunks plus the dense part however large the model is. The state dict is
opened memory-mapped and each chunk's source pages are handed back to the kernel once
written (``madvise(MADV_DONTNEED)``). The package is written to a temporary directory
beside ``out`` and renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from kernels.quantize import FLOAT_DTYPES, QUANTIZED, quantize_rowwise
from recserve.layout import EMBEDDING_PREFIX, state_dict_shapes
from recserve.package import (
    DENSE_FILE,
    MANIFEST,
    FileEntry,
    Manifest,
    ModelPackage,
    PackageError,
    shard_file,
    slice_prefix,
    weight_dtype,
    weight_shape,
)
from recserve.safetensors_stream import StreamingSafetensorsWriter, TensorSlot
from recserve.workloads import WorkloadConfig
from sharding.types import Shard, ShardPlan, TableSlice, row_bytes

CHUNK_BYTES = 64 << 20  # fp32 bytes of rows converted at a time

_libc = ctypes.CDLL(None, use_errno=True)
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _release(t: torch.Tensor) -> None:
    """Drop the resident pages behind a read-only, memory-mapped tensor (best effort)."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the tensor
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_threads() -> int:
    return len(os.sched_getaffinity(0))


class RowSource(Protocol):
    """Where the rows of the tables come from."""

    def block_rows(self, table: str) -> int:
        """Rows per chunk of ``table``: chunks start at multiples of it (or at a slice's start)."""
        ...

    def rows(self, table: str, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) of ``table`` (within one block) as float [end - start, dim], on any device."""
        ...

    def release(self, rows: torch.Tensor) -> None:
        """Called once the bytes made from ``rows`` are written and hashed."""
        ...


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    path: Path
    bytes: int  # total bytes of the package files
    seconds: float
    peak_rss: int  # bytes: peak resident memory of this process
    largest_table: int  # bytes of the largest table (fp32)
    threads: int = 1

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9

    def summary(self) -> str:
        return (
            f"wrote {self.path}: {self.bytes:,} bytes in {self.seconds:.1f}s ({self.gb_per_s:.2f} GB/s, "
            f"{self.threads} threads); peak RSS {self.peak_rss / 2**20:,.0f} MiB "
            f"(largest table {self.largest_table / 2**20:,.0f} MiB fp32)"
        )


def _check_state_dict(workload: WorkloadConfig, sd: dict[str, torch.Tensor]) -> None:
    """The state dict has exactly the tensors of the workload's torchrec model."""
    expected = state_dict_shapes(workload)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise PackageError(f"state dict does not match workload {workload.name!r}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise PackageError(f"state dict tensor {k} has shape {list(got[k])}, workload {workload.name!r} needs {list(shape)}")


class _StateDictRows:
    """Rows of a memory-mapped torchrec state dict."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.weights = weights  # table -> fp32 [rows, dim], memory-mapped

    def block_rows(self, table: str) -> int:
        return max(1, CHUNK_BYTES // (4 * self.weights[table].shape[1]))

    def rows(self, table: str, start: int, end: int) -> torch.Tensor:
        return self.weights[table][start:end]  # a view into the mapped file

    def release(self, rows: torch.Tensor) -> None:
        _release(rows)


class _Progress:
    """One line per table slice and per shard, and one every ``every_s`` seconds inside a
    long slice; plain lines (no carriage returns), so a captured log reads as well."""

    def __init__(self, total: int, enabled: bool, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s  # total: package bytes
        self.done = 0
        self.t0 = self.t_line = time.perf_counter()
        self.lock = threading.Lock()  # shards are written concurrently

    def say(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.done += nbytes
            now = time.perf_counter()
            if now - self.t_line >= self.every_s:
                self.say(f"    {self.done / 1e9:,.2f} / {self.total / 1e9:,.2f} GB ({self.rate():.2f} GB/s)")
                self.t_line = now

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9) / 1e9

    def line(self, text: str) -> None:
        with self.lock:
            self.t_line = time.perf_counter()
            self.say(f"{text}; {self.done / 1e9:,.2f} / {self.total / 1e9:,.2f} GB done ({self.rate():.2f} GB/s)")


@dataclass(frozen=True)
class _Chunk:
    slice: TableSlice
    start: int  # table rows [start, end)
    end: int
    offset: int  # file offset of its weight bytes
    last: bool  # the slice's last chunk


def _slots(shard: Shard, dtype: str) -> list[TensorSlot]:
    slots = []
    for s in shard.slices:
        p = slice_prefix(s.table, s.row_start, s.row_end)
        slots.append(TensorSlot(f"{p}.weight", weight_dtype(dtype), weight_shape(s.rows, s.dim, dtype)))
        if dtype in QUANTIZED:  # scale and bias follow the weight: fp32 [rows] each
            slots.append(TensorSlot(f"{p}.scale", torch.float32, (s.rows,)))
            slots.append(TensorSlot(f"{p}.bias", torch.float32, (s.rows,)))
    return slots


def _chunks(shard: Shard, source: RowSource, writer: StreamingSafetensorsWriter, dtype: str) -> Iterator[_Chunk]:
    for s in shard.slices:
        step = source.block_rows(s.table)
        row_bytes = weight_shape(1, s.dim, dtype)[1] * weight_dtype(dtype).itemsize
        base = writer.offset(f"{slice_prefix(s.table, s.row_start, s.row_end)}.weight")
        a = s.row_start
        while a < s.row_end:
            b = min((a // step + 1) * step, s.row_end)  # chunks end on block boundaries
            yield _Chunk(s, a, b, base + (a - s.row_start) * row_bytes, b == s.row_end)
            a = b


def _write_shard(
    path: Path, shard: Shard, dtype: str, source: RowSource, pool: ThreadPoolExecutor, window: int, progress: _Progress
) -> str:
    """Write one shard file; returns its sha256."""
    writer = StreamingSafetensorsWriter(path, _slots(shard, dtype))
    # quantized: each slice's fp32 scales and biases [rows], written after its weight
    scale_bias: dict[TableSlice, tuple[torch.Tensor, torch.Tensor]] = {}

    def convert(c: _Chunk) -> tuple[torch.Tensor, memoryview]:
        src = source.rows(c.slice.table, c.start, c.end)  # float [rows, dim]
        if dtype in QUANTIZED:
            q, scale, bias = quantize_rowwise(src, dtype)
            scales, biases = scale_bias[c.slice]
            scales[c.start - c.slice.row_start : c.end - c.slice.row_start] = scale.cpu()
            biases[c.start - c.slice.row_start : c.end - c.slice.row_start] = bias.cpu()
            out = q.cpu()
        else:
            out = src.to(FLOAT_DTYPES[dtype]).cpu()
        return src, writer.write_at(c.offset, out)

    pending: deque[tuple[_Chunk, Future]] = deque()
    t_slice = time.perf_counter()

    def finish_oldest() -> None:
        nonlocal t_slice
        c, fut = pending.popleft()
        src, data = fut.result()
        writer.hash_next(c.offset, data)
        source.release(src)
        progress.add(len(data))
        if c.last:
            s = c.slice
            prefix = slice_prefix(s.table, s.row_start, s.row_end)
            if dtype in QUANTIZED:
                for part, t in zip(("scale", "bias"), scale_bias.pop(s)):
                    off = writer.offset(f"{prefix}.{part}")
                    data = writer.write_at(off, t)
                    writer.hash_next(off, data)
                    progress.add(len(data))
            now = time.perf_counter()
            progress.line(f"  shard {shard.index}: {s.table}[{s.row_start}:{s.row_end}) {s.rows:,} x {s.dim} "
                          f"in {now - t_slice:.1f}s")
            t_slice = now

    try:
        for c in _chunks(shard, source, writer, dtype):
            if dtype in QUANTIZED and c.start == c.slice.row_start:
                scale_bias[c.slice] = (torch.empty(c.slice.rows), torch.empty(c.slice.rows))
            pending.append((c, pool.submit(convert, c)))
            while len(pending) >= window:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        for _, fut in pending:
            fut.cancel()
    return writer.close()


def write_package(
    workload: WorkloadConfig,
    out: str | Path,
    *,
    plan: ShardPlan,
    dense: dict[str, torch.Tensor],
    source: RowSource,
    name: str | None = None,
    version: str | None = None,
    dropped_features: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
) -> ExportResult:
    """Write the package of ``workload`` sharded by ``plan``: the ``dense`` tensors (fp32,
    torchrec keys) and every table's rows from ``source``."""
    t0 = time.perf_counter()
    out = Path(out)
    threads = threads or default_threads()
    if threads < 1:
        raise ValueError(f"threads: must be at least 1, got {threads}")
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    dtype = plan.dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "shards").mkdir()
        files: dict[str, FileEntry] = {}
        writer = StreamingSafetensorsWriter(tmp / DENSE_FILE, [TensorSlot(k, torch.float32, tuple(v.shape)) for k, v in dense.items()])
        for v in dense.values():
            writer.write(v.float())
        files[DENSE_FILE] = FileEntry(sha256=writer.close(), bytes=(tmp / DENSE_FILE).stat().st_size)

        total = sum(s.rows * row_bytes(s.dim, dtype) for sh in plan.shards for s in sh.slices)  # bytes
        report = _Progress(total, progress)
        # Shard files are written concurrently, each hashed by its own thread (one file's
        # sha256 is sequential); they share the conversion threads and 2 x threads chunks.
        concurrent = min(plan.num_shards, threads)
        report.say(f"writing {total / 1e9:,.2f} GB of {dtype} tables in {plan.num_shards} shard(s) "
                   f"({concurrent} at a time), {threads} threads")

        def write_shard(sh: Shard) -> tuple[str, FileEntry]:
            rel = shard_file(sh.index)
            t_shard = time.perf_counter()
            digest = _write_shard(tmp / rel, sh, dtype, source, pool, max(2, 2 * threads // concurrent), report)
            entry = FileEntry(sha256=digest, bytes=(tmp / rel).stat().st_size)
            report.line(f"shard {sh.index}: {entry.bytes:,} bytes in {time.perf_counter() - t_shard:.1f}s")
            return rel, entry

        with (
            ThreadPoolExecutor(threads, thread_name_prefix="export") as pool,
            ThreadPoolExecutor(concurrent, thread_name_prefix="export-shard") as shard_writers,
        ):
            files |= dict(shard_writers.map(write_shard, plan.shards))  # in shard order

        if version is None:  # content-derived: the same model and plan give the same version
            h = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode())
            for rel in sorted(files):
                h.update(files[rel].sha256.encode())
            version = h.hexdigest()[:12]
        manifest = Manifest(
            name=name or workload.name,
            version=version,
            workload=workload,
            dtype=dtype,
            plan=plan,
            dense_tensors={k: tuple(v.shape) for k, v in dense.items()},
            files=files,
            dropped_features=tuple(dropped_features),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=1))
        ModelPackage.open(tmp)  # the manifest we wrote must pass our own schema
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(
        path=out,
        bytes=sum(f.bytes for f in files.values()),
        seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(),
        largest_table=max((t.rows * t.dim * 4 for t in workload.tables), default=0),
        threads=threads,
    )


def export_package(
    workload: WorkloadConfig, state_dict_path: str | Path, out: str | Path, *, plan: ShardPlan, **options
) -> ExportResult:
    """Write the package for ``workload`` from a torchrec state dict, sharded by ``plan``;
    ``options`` are :func:`write_package`'s (name, version, dropped_features, overwrite,
    progress, threads)."""
    sd = torch.load(state_dict_path, mmap=True, weights_only=True, map_location="cpu")
    _check_state_dict(workload, sd)
    weights = {k[len(EMBEDDING_PREFIX) : -len(".weight")]: v for k, v in sd.items() if k.startswith(EMBEDDING_PREFIX)}
    dense = {k: v for k, v in sd.items() if not k.startswith(EMBEDDING_PREFIX)}
    return write_package(workload, out, plan=plan, dense=dense, source=_StateDictRows(weights), **options)
