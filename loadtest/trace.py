"""A seeded request trace from a workload, encoded for ``recserve.v1.Ranker/Predict``.

Every load generator (the bench driver, the locust user) replays the same kind of trace:
:class:`recserve.synth.TrafficGenerator` draws the batches (batch sizes from the
workload's ``samples_per_request``, ids per table from its distribution, bag sizes
around the pooling factor, dense features standard normal), and each batch is encoded
once, up front, into the serialized ``PredictRequest`` bytes that go on the wire, so the
sender spends no time encoding.

:func:`fanout` says what a request costs the sharded stack under a plan: how many shards
it calls (a shard none of whose table slices gets an id is not called) and an estimate
of the bytes that move between deployments (ids to the shards, pooled embeddings and
dense features to the dense tower, scores back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recserve.batch import Batch
from recserve.synth import TrafficGenerator
from recserve.v1 import ranker_pb2
from recserve.workloads import WorkloadConfig
from sharding.types import ShardPlan


def encode_request(batch: Batch, *, model: str = "", request_id: str = "") -> ranker_pb2.PredictRequest:
    """The gRPC request for ``batch`` (dense row-major, sparse as packed jagged arrays)."""
    req = ranker_pb2.PredictRequest(
        model=model,
        request_id=request_id,
        batch_size=batch.batch_size,
        dense=np.ascontiguousarray(batch.dense, np.float32).ravel(),  # [B * F]
    )
    for name, bags in batch.sparse.items():
        feat = req.sparse[name]
        feat.values.extend(bags.values)  # [N] int64
        feat.lengths.extend(bags.lengths)  # [B] int32
        if bags.weights is not None:
            feat.weights.extend(bags.weights)  # [N] float32
    if batch.unit_ids is not None:
        req.unit_ids.extend(batch.unit_ids)  # [B] uint64
    return req


@dataclass(frozen=True)
class Trace:
    """``len(payloads)`` requests drawn from ``workload`` with ``seed``."""

    workload: WorkloadConfig
    seed: int
    batches: tuple[Batch, ...]
    payloads: tuple[bytes, ...]  # serialized PredictRequest, one per batch

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def batch_sizes(self) -> np.ndarray:
        return np.array([b.batch_size for b in self.batches], np.int64)  # [n]

    @property
    def request_bytes(self) -> np.ndarray:
        return np.array([len(p) for p in self.payloads], np.int64)  # [n] bytes


def make_trace(workload: WorkloadConfig, num_requests: int, *, seed: int = 0, model: str = "") -> Trace:
    """``num_requests`` seeded requests shaped like ``workload`` (same seed, same bytes)."""
    if num_requests <= 0:
        raise ValueError(f"num_requests: must be positive, got {num_requests}")
    gen = TrafficGenerator(workload, seed=seed)
    batches = tuple(gen.trace(num_requests))
    payloads = tuple(
        encode_request(b, model=model, request_id=f"{seed}-{i}").SerializeToString() for i, b in enumerate(batches)
    )
    return Trace(workload=workload, seed=seed, batches=batches, payloads=payloads)


def cap_rows_to_served(workload: WorkloadConfig, info: ranker_pb2.ModelInfoResponse) -> WorkloadConfig:
    """``workload`` with each table's rows capped at what the server says it holds.

    A server started with a row cap (e.g. criteo-kaggle at 100k rows) rejects larger ids;
    asking ``ModelInfo`` keeps a trace valid for whatever package is being served.
    """
    import dataclasses

    served = {t.name: int(t.rows) for t in info.tables}
    tables = tuple(
        dataclasses.replace(t, rows=min(t.rows, served[t.name])) if t.name in served else t for t in workload.tables
    )
    return dataclasses.replace(workload, tables=tables)


@dataclass(frozen=True)
class Fanout:
    """Per-request cost of the trace on the sharded stack under one plan."""

    shard_calls: np.ndarray  # int64 [n] shards called by each request
    internal_bytes: np.ndarray  # int64 [n] estimated bytes between deployments


def fanout(trace: Trace, plan: ShardPlan) -> Fanout:
    """Shards each request calls and the bytes it moves between deployments (estimate).

    Bytes counted per request: to each called shard, the ids routed to it (8 B each) and
    the lengths of each routed feature (4 B x B); from each called shard, one pooled fp32
    vector per example for each table slice that received ids; to the dense tower the
    dense features (4 B x B x F); back, one fp32 score per example.
    """
    w = trace.workload
    calls = np.zeros(len(trace), np.int64)
    nbytes = np.zeros(len(trace), np.int64)
    features_of = {t.name: t.features for t in w.tables}
    for i, batch in enumerate(trace.batches):
        b = batch.batch_size
        total = 4 * b * w.dense_features + 4 * b  # dense to the tower, scores back
        for shard in plan.shards:
            shard_bytes = 0
            for s in shard.slices:
                for feature in features_of.get(s.table, ()):
                    bags = batch.sparse.get(feature)
                    if bags is None:
                        continue
                    v = bags.values
                    n = int(np.count_nonzero((v >= s.row_start) & (v < s.row_end))) if not s.is_whole else v.size
                    if n:
                        shard_bytes += 8 * n + 4 * b + 4 * b * s.dim  # ids + lengths in, pooled out
            if shard_bytes:
                calls[i] += 1
                total += shard_bytes
        nbytes[i] = total
    return Fanout(shard_calls=calls, internal_bytes=nbytes)
