"""The row format of the served-example log, shared by its writer (serving/example_log.py),
the teacher scoring job (serving/teacher.py), the label drawer and student training.

One row per example (one request of B examples gives B rows)::

    request_id     string                 the caller's PredictRequest.request_id
    example_index  int32                  position of the example in its request
    unit_id        uint64 (null: none)    the example's unit (e.g. user)
    logged_at      timestamp[us, UTC]     when the server scored it
    model          string                 served model name ...
    model_version  string                 ... and version that produced ``score``
    dense          list<float32>          [F] dense features as the caller sent them
    score          float32                the served score (sigmoid)
    faded          list<string>           features that fading removed for this example
    ids.<f>        list<int64>            ids of sparse feature f, as sent (before fading)
    weights.<f>    list<float32> or null  per-id weights of f, null when the request had none

Features are logged as the caller sent them, before fading, so a teacher with features the
student lost can still use them; ``faded`` says what the served model did not see.

:func:`example_keys` keys an example by its features (dense values, and every feature's ids
and weights, in sorted feature order): the teacher job scores each key once.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recserve.batch import Bags, Batch

IDS_PREFIX = "ids."
WEIGHTS_PREFIX = "weights."
KEY = "example_key"  # string, 32 hex digits (two 64-bit lanes)
TMP_PREFIX = ".tmp-"  # files being written; hidden, so readers (pyarrow, Ray Data) skip them
LABEL = "label"  # float32 click (0 or 1), added by `recserve synth labels`

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def log_schema(features: tuple[str, ...]) -> pa.Schema:
    """The schema of a log file for a model with these sparse features (model order)."""
    fields = [
        pa.field("request_id", pa.string()),
        pa.field("example_index", pa.int32()),
        pa.field("unit_id", pa.uint64()),
        pa.field("logged_at", pa.timestamp("us", tz="UTC")),
        pa.field("model", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("dense", pa.list_(pa.float32())),
        pa.field("score", pa.float32()),
        pa.field("faded", pa.list_(pa.string())),
    ]
    for f in features:
        fields.append(pa.field(IDS_PREFIX + f, pa.list_(pa.int64())))
        fields.append(pa.field(WEIGHTS_PREFIX + f, pa.list_(pa.float32())))
    return pa.schema(fields)


def _list(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(lengths.shape[0] + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


def batch_table(
    batch: Batch,
    scores: np.ndarray,  # float32 [B]
    *,
    request_id: str,
    logged_at: float,  # seconds since the epoch
    model: str,
    version: str,
    features: tuple[str, ...],
    faded: list[list[str]] | None = None,  # per example, the features fading removed
) -> pa.Table:
    """The B rows of one scored request (built off the request path, by the writer thread)."""
    B = batch.batch_size
    cols: dict[str, pa.Array] = {
        "request_id": pa.array([request_id] * B, pa.string()),
        "example_index": pa.array(np.arange(B, dtype=np.int32)),
        "unit_id": pa.nulls(B, pa.uint64()) if batch.unit_ids is None else pa.array(batch.unit_ids, pa.uint64()),
        "logged_at": pa.array(np.full(B, int(logged_at * 1e6), np.int64)).cast(pa.timestamp("us", tz="UTC")),
        "model": pa.array([model] * B, pa.string()),
        "model_version": pa.array([version] * B, pa.string()),
        "dense": _list(batch.dense.reshape(-1), np.full(B, batch.dense.shape[1], np.int32), pa.float32()),
        "score": pa.array(np.asarray(scores, np.float32)),
        "faded": pa.array(faded if faded is not None else [[]] * B, pa.list_(pa.string())),
    }
    for f in features:
        bags = batch.sparse.get(f) or Bags.empty(B)
        cols[IDS_PREFIX + f] = _list(bags.values, bags.lengths, pa.int64())
        cols[WEIGHTS_PREFIX + f] = (
            pa.nulls(B, pa.list_(pa.float32())) if bags.weights is None
            else _list(bags.weights, bags.lengths, pa.float32())
        )
    return pa.Table.from_pydict(cols, schema=log_schema(features))


def logged_features(schema: pa.Schema) -> tuple[str, ...]:
    """The sparse features a log table carries (in column order)."""
    return tuple(n[len(IDS_PREFIX):] for n in schema.names if n.startswith(IDS_PREFIX))


def _bags(ids: pa.ListArray, weights: pa.ListArray | None) -> Bags:
    offsets = ids.offsets.to_numpy()
    values = ids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int64, copy=False)
    lengths = np.diff(offsets).astype(np.int32)
    w = None
    if weights is not None and weights.null_count < len(weights):
        if weights.null_count:
            raise ValueError("weights: some examples of a batch have per-id weights and some have none")
        wo = weights.offsets.to_numpy()
        w = weights.values.to_numpy(zero_copy_only=False)[wo[0]:wo[-1]].astype(np.float32, copy=False)
    return Bags(values, lengths, w)


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def table_batch(table: pa.Table | pa.RecordBatch, features: tuple[str, ...] | None = None) -> Batch:
    """Log rows as a Batch: ``features`` (default: all logged ones); a feature the log lacks
    comes back as empty bags."""
    names = table.schema.names
    B = table.num_rows
    dense_col = _combined(table.column("dense"))
    width = len(dense_col[0]) if B else 0
    lengths = np.diff(dense_col.offsets.to_numpy())
    if B and (lengths != width).any():
        raise ValueError("dense: rows of different widths in one batch of logged examples")
    dense = dense_col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(B, width)  # [B, F]
    sparse = {}
    for f in features if features is not None else logged_features(table.schema):
        if IDS_PREFIX + f not in names:
            sparse[f] = Bags.empty(B)
            continue
        w = _combined(table.column(WEIGHTS_PREFIX + f)) if WEIGHTS_PREFIX + f in names else None
        sparse[f] = _bags(_combined(table.column(IDS_PREFIX + f)), w)
    units = None
    if "unit_id" in names:
        u = _combined(table.column("unit_id"))
        if u.null_count == 0:
            units = u.to_numpy(zero_copy_only=False).astype(np.uint64)
    return Batch(dense, sparse, units)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over uint64 (wraps by design)."""
    z = z + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def _segment_hash(items: np.ndarray, lengths: np.ndarray, lane: np.uint64) -> np.ndarray:
    """Order-sensitive hash of each example's items (uint64 [N] grouped by ``lengths``): uint64 [B]."""
    B = lengths.shape[0]
    out = _mix(lengths.astype(np.uint64) ^ lane)  # [B]: the count is part of the key
    if items.size:
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [N]
        pos = np.arange(items.size, dtype=np.int64) - starts  # [N] position within the bag
        h = _mix(_mix(items ^ lane) + pos.astype(np.uint64))  # [N]
        owner = np.repeat(np.arange(B), lengths)
        acc = np.zeros(B, np.uint64)
        np.add.at(acc, owner, h)
        out = _mix(out ^ acc)
    return out


def example_keys(batch: Batch) -> list[str]:
    """A 128-bit key of each example's features (dense values, then each feature's ids and
    weights in sorted feature order; unit id, request id and time are not part of it)."""
    B = batch.batch_size
    lanes = []
    for lane in (np.uint64(0x5EED0001), np.uint64(0x5EED0002)):
        dense_bits = np.ascontiguousarray(batch.dense, np.float32).view(np.uint32).astype(np.uint64)  # [B, F]
        h = _segment_hash(dense_bits.reshape(-1), np.full(B, batch.dense.shape[1], np.int64), lane)
        for i, f in enumerate(sorted(batch.sparse)):
            bags = batch.sparse[f]
            fl = lane + np.uint64(1 + 2 * i)
            h = _mix(h ^ _segment_hash(bags.values.astype(np.uint64), bags.lengths.astype(np.int64), fl))
            if bags.weights is not None:
                wbits = bags.weights.astype(np.float32).view(np.uint32).astype(np.uint64)
                h = _mix(h ^ _segment_hash(wbits, bags.lengths.astype(np.int64), fl + np.uint64(1)))
        lanes.append(h)
    return [f"{a:016x}{b:016x}" for a, b in zip(lanes[0].tolist(), lanes[1].tolist())]


def open_dir(log_dir: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local directory or a pyarrow filesystem URL."""
    if "://" in log_dir:
        return pafs.FileSystem.from_uri(log_dir)
    return pafs.LocalFileSystem(), os.path.abspath(log_dir)


def write_atomic(fs: pafs.FileSystem, directory: str, name: str, table: pa.Table) -> int:
    """Write ``table`` as ``directory/name`` through a hidden temporary file and a rename;
    returns the bytes written."""
    tmp = f"{directory}/{TMP_PREFIX}{name}"
    with fs.open_output_stream(tmp) as out:
        pq.write_table(table, out, compression="zstd")
        size = out.tell()
    fs.move(tmp, f"{directory}/{name}")
    return size


def parquet_files(location: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, visible .parquet files) of a directory or URL, sorted; none if it does not exist."""
    fs, root = open_dir(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [root]
    if info.type == pafs.FileType.NotFound:
        return fs, []
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return fs, sorted(f.path for f in found if f.is_file and f.path.endswith(".parquet")
                      and not any(part.startswith((".", "_")) for part in f.path[len(root):].split("/")))
