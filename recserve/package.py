"""The model package: the contract between offline export and online serving.

A package is a directory::

    manifest.json                   format version, model name/version, tables, dense
                                    architecture, the sharding plan, sha256 of every file
    dense.safetensors               bottom MLP, interaction (DCNv2) and top MLP weights,
                                    under torchrec's DLRM state-dict keys
    shards/shard-K.safetensors      only shard K's tables or row slices of tables

Loading never unpickles: the manifest is JSON and tensors are safetensors (memory-mapped).
Every problem is a :class:`PackageError` that names the file and what is wrong; serving
runs the same checks on load and keeps the running version if they fail.

In a shard file, a slice of table ``t`` covering rows [a, b) stores ``t.a-b.weight``
(fp32/fp16/bf16 [b-a, dim]; uint8 [b-a, dim] for int8; uint8 [b-a, ceil(dim/2)] for
int4) and, quantized only, ``t.a-b.scale`` and ``t.a-b.bias`` (fp32 [b-a]): the storage
format of ``kernels/quantize.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kernels.quantize import QUANTIZED, weight_cols, weight_dtype
from recserve.workloads import WorkloadConfig, WorkloadError, workload_from_json
from sharding.types import DTYPES, ShardPlan

FORMAT = "recserve-model-package"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"



class PackageError(Exception):
    """A package is missing, corrupt or inconsistent; the message names the file."""


def shard_file(index: int) -> str:
    return f"shards/shard-{index}.safetensors"


def slice_prefix(table: str, row_start: int, row_end: int) -> str:
    return f"{table}.{row_start}-{row_end}"


def weight_shape(rows: int, dim: int, dtype: str) -> tuple[int, int]:
    return (rows, weight_cols(dim, dtype))


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    name: str
    version: str
    workload: WorkloadConfig  # tables (with features, rows, dim, pooling) and dense architecture
    dtype: str  # storage dtype of every table
    plan: ShardPlan
    dense_tensors: dict[str, tuple[int, ...]]  # dense state-dict key -> shape
    files: dict[str, FileEntry]  # relative path -> checksum and size
    dropped_features: tuple[str, ...] = ()  # features whose tables were dropped (faded out)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"name": self.name, "version": self.version},
            "workload": self.workload.to_json(),
            "dtype": self.dtype,
            "plan": self.plan.to_json(),
            "dense_tensors": {k: list(v) for k, v in self.dense_tensors.items()},
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in self.files.items()},
            "dropped_features": list(self.dropped_features),
        }

    @property
    def served_features(self) -> tuple[str, ...]:
        """Features whose tables the package holds (model order)."""
        return tuple(f for f in self.workload.features if f not in self.dropped_features)


_MANIFEST_KEYS = {
    "format": str,
    "format_version": int,
    "model": dict,
    "workload": dict,
    "dtype": str,
    "plan": dict,
    "dense_tensors": dict,
    "files": dict,
    "dropped_features": list,
}


def parse_manifest(raw: Any) -> Manifest:
    """Validate a manifest object against the schema; PackageError names the field."""

    def fail(msg: str) -> PackageError:
        return PackageError(f"{MANIFEST}: {msg}")

    if not isinstance(raw, dict):
        raise fail("must be a JSON object")
    unknown = set(raw) - set(_MANIFEST_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}")
    for key, typ in _MANIFEST_KEYS.items():
        if key not in raw:
            raise fail(f"missing field {key!r}")
        if not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            raise fail(f"field {key!r} must be {typ.__name__}")
    if raw["format"] != FORMAT:
        raise fail(f"format is {raw['format']!r}, expected {FORMAT!r}")
    if raw["format_version"] != FORMAT_VERSION:
        raise fail(f"format_version {raw['format_version']} is not supported (this build reads {FORMAT_VERSION})")
    model = raw["model"]
    if set(model) != {"name", "version"} or not all(isinstance(v, str) and v for v in model.values()):
        raise fail("model must be {'name': str, 'version': str}")
    try:
        workload = workload_from_json(raw["workload"], name=model["name"])
    except (WorkloadError, TypeError) as e:
        raise fail(f"workload: {e}") from None
    if raw["dtype"] not in DTYPES:
        raise fail(f"dtype {raw['dtype']!r} must be one of {DTYPES}")
    try:
        plan = ShardPlan.from_json(raw["plan"])
    except (KeyError, TypeError, ValueError) as e:
        raise fail(f"plan: malformed ({e})") from None
    files = {}
    for path, entry in raw["files"].items():
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            raise fail(f"files[{path!r}] must be {{'sha256', 'bytes'}}")
        files[path] = FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])
    dense = {}
    for key, shape in raw["dense_tensors"].items():
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise fail(f"dense_tensors[{key!r}] must be a list of sizes")
        dense[key] = tuple(shape)
    dropped = tuple(raw["dropped_features"])
    manifest = Manifest(
        name=model["name"],
        version=model["version"],
        workload=workload,
        dtype=raw["dtype"],
        plan=plan,
        dense_tensors=dense,
        files=files,
        dropped_features=dropped,
    )
    _check_plan_matches_tables(manifest)
    return manifest


def _check_plan_matches_tables(m: Manifest) -> None:
    """Every kept table is covered exactly once by the plan's row slices."""
    tables = {t.name: t for t in m.workload.tables_without(m.dropped_features)}
    if set(m.plan.tables) != set(tables):
        raise PackageError(
            f"{MANIFEST}: plan places tables {sorted(m.plan.tables)} but the model has {sorted(tables)}"
        )
    for name, t in tables.items():
        slices = m.plan.slices_of(name)
        end = 0
        for _, s in slices:
            if s.row_start != end or s.dim != t.dim or s.rows_total != t.rows:
                raise PackageError(f"{MANIFEST}: plan slices of table {name!r} do not tile its {t.rows} rows")
            end = s.row_end
        if end != t.rows:
            raise PackageError(f"{MANIFEST}: plan covers rows [0, {end}) of table {name!r}, which has {t.rows}")
    for sh in m.plan.shards:
        if shard_file(sh.index) not in m.files:
            raise PackageError(f"{MANIFEST}: no checksum entry for {shard_file(sh.index)}")
    if DENSE_FILE not in m.files:
        raise PackageError(f"{MANIFEST}: no checksum entry for {DENSE_FILE}")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, kw_only=True)
class SliceWeights:
    """One table slice of a shard, as stored: ready for a lookup kernel."""

    table: str
    row_start: int
    row_end: int
    dim: int
    dtype: str
    weight: torch.Tensor  # see module docstring for shapes and dtypes
    scale: torch.Tensor | None = None  # fp32 [rows], quantized only
    bias: torch.Tensor | None = None  # fp32 [rows], quantized only


class ModelPackage:
    """An opened, schema-checked package. File contents are verified when loaded."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @staticmethod
    def open(path: str | Path) -> ModelPackage:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise PackageError(f"{mpath}: not found (is {path} a recserve model package?)")
        try:
            raw = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PackageError(f"{mpath}: not valid JSON ({e})") from None
        return ModelPackage(path, parse_manifest(raw))

    def verify_file(self, rel: str) -> Path:
        """Check size and sha256 of one file against the manifest."""
        entry = self.manifest.files.get(rel)
        if entry is None:
            raise PackageError(f"{rel}: not listed in {MANIFEST}")
        full = self.path / rel
        if not full.is_file():
            raise PackageError(f"{rel}: missing")
        size = full.stat().st_size
        if size != entry.bytes:
            raise PackageError(f"{rel}: size {size} bytes, manifest says {entry.bytes} (truncated or replaced?)")
        digest = sha256_file(full)
        if digest != entry.sha256:
            raise PackageError(f"{rel}: sha256 {digest[:16]}... does not match the manifest ({entry.sha256[:16]}...)")
        return full

    def _read(self, rel: str, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        full = self.verify_file(rel)
        try:
            with safe_open(str(full), framework="pt") as f:
                keys = set(f.keys())
                if keys != set(expected):
                    missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
                    raise PackageError(f"{rel}: tensors do not match the manifest (missing {missing}, unexpected {extra})")
                out = {k: f.get_tensor(k) for k in expected}
        except PackageError:
            raise
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise PackageError(f"{rel}: unreadable safetensors file ({e})") from None
        for key, (shape, dtype) in expected.items():
            t = out[key]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise PackageError(
                    f"{rel}: tensor {key} is {t.dtype} {list(t.shape)}, manifest implies {dtype} {list(shape)}"
                )
        return out

    def load_dense(self) -> dict[str, torch.Tensor]:
        """The dense state dict (torchrec DLRM keys minus the embedding tables)."""
        expected = {k: (shape, torch.float32) for k, shape in self.manifest.dense_tensors.items()}
        return self._read(DENSE_FILE, expected)

    def shard_slices(self, index: int) -> list[tuple[str, int, int, int]]:
        """(table, row_start, row_end, dim) of every slice on shard ``index``."""
        shards = {sh.index: sh for sh in self.manifest.plan.shards}
        if index not in shards:
            raise PackageError(f"{MANIFEST}: no shard {index} (package has {sorted(shards)})")
        return [(s.table, s.row_start, s.row_end, s.dim) for s in shards[index].slices]

    def load_shard(self, index: int) -> list[SliceWeights]:
        """Shard ``index``'s table slices, verified against the manifest."""
        dtype = self.manifest.dtype
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for table, a, b, dim in self.shard_slices(index):
            p = slice_prefix(table, a, b)
            expected[f"{p}.weight"] = (weight_shape(b - a, dim, dtype), weight_dtype(dtype))
            if dtype in QUANTIZED:
                expected[f"{p}.scale"] = ((b - a,), torch.float32)
                expected[f"{p}.bias"] = ((b - a,), torch.float32)
        tensors = self._read(shard_file(index), expected)
        out = []
        for table, a, b, dim in self.shard_slices(index):
            p = slice_prefix(table, a, b)
            out.append(
                SliceWeights(
                    table=table,
                    row_start=a,
                    row_end=b,
                    dim=dim,
                    dtype=dtype,
                    weight=tensors[f"{p}.weight"],
                    scale=tensors.get(f"{p}.scale"),
                    bias=tensors.get(f"{p}.bias"),
                )
            )
        return out

    def verify(self) -> None:
        """Every check serving would run, on every file."""
        self.load_dense()
        for sh in self.manifest.plan.shards:
            self.load_shard(sh.index)
        listed = set(self.manifest.files)
        needed = {DENSE_FILE} | {shard_file(sh.index) for sh in self.manifest.plan.shards}
        if listed != needed:
            raise PackageError(f"{MANIFEST}: files lists {sorted(listed - needed)} that the plan does not use")

    def describe(self) -> str:
        m = self.manifest
        w = m.workload
        lines = [
            f"model {m.name} version {m.version}  dtype {m.dtype}  interaction {w.interaction}",
            f"dense: {w.dense_features} features, bottom MLP {list(w.bottom_mlp)}, top MLP {list(w.top_mlp)}"
            + (f", DCNv2 {w.dcn_layers} layers rank {w.dcn_low_rank}" if w.interaction == "dcnv2" else ""),
            f"{'table':<16} {'features':<28} {'rows':>12} {'dim':>5} {'pool':>6}",
        ]
        for t in w.tables:
            lines.append(f"{t.name:<16} {','.join(t.features):<28} {t.rows:>12,} {t.dim:>5} {t.pooling_factor:>6g}")
        if m.dropped_features:
            lines.append(f"dropped (faded out, tables not stored): {', '.join(m.dropped_features)}")
        lines.append(str(m.plan))
        lines.append("files:")
        for rel, e in sorted(m.files.items()):
            lines.append(f"  {rel:<32} {e.bytes:>14,} bytes  sha256 {e.sha256[:16]}...")
        return "\n".join(lines)
