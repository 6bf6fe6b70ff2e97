"""Export a trained torchrec model into a model package (see :mod:`recserve.package`).

The state dict is opened memory-mapped and written out table by table, ``CHUNK_BYTES``
of rows at a time; after each chunk its source pages are handed back to the kernel
(``madvise(MADV_DONTNEED)``), so peak memory stays near one chunk plus the dense part
however large the model is. The package is written to a temporary directory beside
``out`` and renamed into place only when complete.
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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kernels.quantize import FLOAT_DTYPES, QUANTIZED, quantize_rowwise
from recserve.model import EMBEDDING_PREFIX, build_model
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
from sharding.types import ShardPlan

CHUNK_BYTES = 64 << 20  # rows converted at a time

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


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    path: Path
    bytes: int  # total bytes of the package files
    seconds: float
    peak_rss: int  # bytes: peak resident memory of this process
    largest_table: int  # bytes of the largest table in the state dict (fp32)


def _check_state_dict(workload: WorkloadConfig, sd: dict[str, torch.Tensor]) -> None:
    """The state dict has exactly the tensors of the workload's torchrec model."""
    expected = {k: tuple(v.shape) for k, v in build_model(workload, device="meta").state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise PackageError(f"state dict does not match workload {workload.name!r}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise PackageError(f"state dict tensor {k} has shape {list(got[k])}, workload {workload.name!r} needs {list(shape)}")


def _write_shard(path: Path, shard, weights: dict[str, torch.Tensor], dtype: str, bar: tqdm) -> str:
    slots = []
    for s in shard.slices:
        p = slice_prefix(s.table, s.row_start, s.row_end)
        slots.append(TensorSlot(f"{p}.weight", weight_dtype(dtype), weight_shape(s.rows, s.dim, dtype)))
        if dtype in QUANTIZED:
            slots.append(TensorSlot(f"{p}.scale", torch.float32, (s.rows,)))
            slots.append(TensorSlot(f"{p}.bias", torch.float32, (s.rows,)))
    writer = StreamingSafetensorsWriter(path, slots)
    for s in shard.slices:
        src = weights[s.table]  # [rows_total, dim], memory-mapped
        step = max(1, CHUNK_BYTES // (4 * s.dim))
        scales, biases = [], []
        for a in range(s.row_start, s.row_end, step):
            b = min(a + step, s.row_end)
            chunk = src[a:b]  # [rows, dim] view into the mapped file
            if dtype in QUANTIZED:
                q, scale, bias = quantize_rowwise(chunk, dtype)
                writer.write(q)
                scales.append(scale)
                biases.append(bias)
            else:
                writer.write(chunk.to(FLOAT_DTYPES[dtype]))
            _release(chunk)
            bar.update((b - a) * s.dim * 4)
        if dtype in QUANTIZED:  # scale and bias follow the weight: fp32 [rows] each
            for parts in (scales, biases):
                for part in parts:
                    writer.write(part)
    return writer.close()


def export_package(
    workload: WorkloadConfig,
    state_dict_path: str | Path,
    out: str | Path,
    *,
    plan: ShardPlan,
    name: str | None = None,
    version: str | None = None,
    dropped_features: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Write the package for ``workload`` from a torchrec state dict, sharded by ``plan``."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise PackageError(f"{out}: already exists (pass overwrite=True / --force to replace it)")
    sd = torch.load(state_dict_path, mmap=True, weights_only=True, map_location="cpu")
    _check_state_dict(workload, sd)
    dtype = plan.dtype
    weights = {k[len(EMBEDDING_PREFIX) : -len(".weight")]: v for k, v in sd.items() if k.startswith(EMBEDDING_PREFIX)}
    dense = {k: v for k, v in sd.items() if not k.startswith(EMBEDDING_PREFIX)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "shards").mkdir()
        files: dict[str, FileEntry] = {}
        dense_slots = [TensorSlot(k, torch.float32, tuple(v.shape)) for k, v in dense.items()]
        writer = StreamingSafetensorsWriter(tmp / DENSE_FILE, dense_slots)
        for k, v in dense.items():
            writer.write(v.float())
        files[DENSE_FILE] = FileEntry(sha256=writer.close(), bytes=(tmp / DENSE_FILE).stat().st_size)

        total = sum(s.rows * s.dim * 4 for sh in plan.shards for s in sh.slices)
        with tqdm(total=total, unit="B", unit_scale=True, desc="export tables", disable=not progress) as bar:
            for sh in plan.shards:
                rel = shard_file(sh.index)
                digest = _write_shard(tmp / rel, sh, weights, dtype, bar)
                files[rel] = FileEntry(sha256=digest, bytes=(tmp / rel).stat().st_size)

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
    largest = max((v.numel() * v.element_size() for v in weights.values()), default=0)
    return ExportResult(
        path=out,
        bytes=sum(f.bytes for f in files.values()),
        seconds=time.perf_counter() - t0,
        peak_rss=peak_rss_bytes(),
        largest_table=largest,
    )
