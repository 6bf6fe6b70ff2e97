"""Synthetic examples and traffic drawn from a workload.

Two uses share one generator of ids:
- :class:`TrafficGenerator` makes request batches shaped like the workload (batch sizes
  from ``samples_per_request``, ids per table from its distribution, bag sizes around the
  table's pooling factor, dense features standard normal). Load tests and benchmarks
  replay its traces; a seed makes a trace reproducible.
- :class:`ClickModel` is a hidden ground truth: the click probability of an example is a
  fixed function of its dense features and of per-id affinities, so a model trained on
  its labels learns something real (held-out AUC well above 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recserve.batch import Bags, Batch
from recserve.workloads import TableConfig, WorkloadConfig

# Knuth's multiplicative-hash prime; larger than any table, so rank -> id is a bijection
# on [0, rows) and hot ids are spread over the whole table (and over row-wise shards).
_SPREAD = 2_654_435_761


def zipf_ids(rng: np.random.Generator, rows: int, n: int, alpha: float) -> np.ndarray:
    """n ids in [0, rows) with P(rank k) ~ k^-alpha (bounded, continuous inverse CDF)."""
    u = rng.random(n)
    if abs(alpha - 1.0) < 1e-9:
        ranks = np.power(float(rows), u)
    else:
        a = 1.0 - alpha
        ranks = np.power((np.power(float(rows), a) - 1.0) * u + 1.0, 1.0 / a)
    ranks = np.minimum(ranks.astype(np.int64) - 1, rows - 1)  # [n] in [0, rows)
    return (ranks * _SPREAD + 12345) % rows


def bag_lengths(rng: np.random.Generator, pooling_factor: float, batch_size: int) -> np.ndarray:
    """Bag sizes with mean ``pooling_factor``: exactly 1 for one-hot, 1 + Poisson otherwise."""
    if pooling_factor <= 1.0:
        return np.ones(batch_size, np.int32)
    return (1 + rng.poisson(pooling_factor - 1.0, batch_size)).astype(np.int32)


@dataclass
class TrafficGenerator:
    """Request batches shaped like ``workload``; same seed, same trace."""

    workload: WorkloadConfig
    seed: int = 0
    empty_bag_fraction: float = 0.0  # share of bags sent empty (missing feature)
    id_shift: int = 0  # ids move by this much (mod rows): other ids become hot (a drifting world) ...
    shifted_fraction: float = 1.0  # ... for this fraction of the draws (the rest keep the usual ids)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def ids(self, table: TableConfig, n: int) -> np.ndarray:
        if self.workload.ids == "zipf":
            ids = zipf_ids(self.rng, table.rows, n, self.workload.zipf_alpha)
        else:
            ids = self.rng.integers(0, table.rows, n, dtype=np.int64)
        if not self.id_shift:
            return ids
        moved = self.rng.random(n) < self.shifted_fraction  # [n]
        return np.where(moved, (ids + self.id_shift) % table.rows, ids)

    def batch_size(self) -> int:
        lo, hi = self.workload.samples_per_request
        return int(self.rng.integers(lo, hi + 1))

    def batch(self, batch_size: int | None = None) -> Batch:
        b = self.batch_size() if batch_size is None else batch_size
        dense = self.rng.standard_normal((b, self.workload.dense_features), dtype=np.float32)
        sparse = {}
        for table in self.workload.tables:
            for feature in table.features:
                lengths = bag_lengths(self.rng, table.pooling_factor, b)
                if self.empty_bag_fraction > 0:
                    lengths[self.rng.random(b) < self.empty_bag_fraction] = 0
                sparse[feature] = Bags(self.ids(table, int(lengths.sum())), lengths)
        unit_ids = self.rng.integers(0, 2**63 - 1, b, dtype=np.int64).astype(np.uint64)
        return Batch(dense, sparse, unit_ids)

    def trace(self, num_requests: int) -> list[Batch]:
        return [self.batch() for _ in range(num_requests)]


def _hash_unit(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 x, mapped to a float in [-sqrt(3), sqrt(3)) (var 1)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) / 2.0**53 - 0.5) * 2.0 * np.sqrt(3.0)


@dataclass
class ClickModel:
    """Hidden ground truth: P(click) = sigmoid(dense part + id affinities + one cross term).

    ``drift`` (radians per day) makes it a drifting world: at ``day`` every id's affinity and
    the dense weights are ``cos(drift * day) * initial + sin(drift * day) * other`` (two
    independent draws), so tastes change smoothly and a model trained on old days goes stale.
    """

    workload: WorkloadConfig
    seed: int = 0
    drift: float = 0.0  # radians per day
    day: float = 0.0

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed + 1_000_003)
        f = self.workload.dense_features
        self.dense_w = rng.standard_normal(f) / np.sqrt(f)  # [F]
        n = len(self.workload.features)
        self.feature_w = rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)  # [n_features]
        self.bias = -1.0
        theta = self.drift * self.day
        self._mix = (np.cos(theta), np.sin(theta))
        if theta:
            other = np.random.default_rng(self.seed + 2_000_003).standard_normal(f) / np.sqrt(f)
            self.dense_w = self._mix[0] * self.dense_w + self._mix[1] * other

    def at(self, day: float) -> ClickModel:
        """The same world on another day."""
        return ClickModel(self.workload, self.seed, self.drift, day)

    def _affinity(self, i: int, bags: Bags) -> np.ndarray:
        """Mean hidden affinity of each example's ids for feature i: float64 [B]."""
        key = bags.values.astype(np.uint64) * np.uint64(1_000_003) + np.uint64(i * 7919 + self.seed)
        a = _hash_unit(key)
        if self._mix[1]:
            a = self._mix[0] * a + self._mix[1] * _hash_unit(key ^ np.uint64(0xD1F7D1F7D1F7))
        sums = np.zeros(bags.batch_size)
        np.add.at(sums, np.repeat(np.arange(bags.batch_size), bags.lengths), a)
        return sums / np.maximum(bags.lengths, 1)

    def logits(self, batch: Batch) -> np.ndarray:
        out = batch.dense.astype(np.float64) @ self.dense_w + self.bias  # [B]
        aff = [self._affinity(i, batch.sparse[f]) for i, f in enumerate(self.workload.features)]
        for w, a in zip(self.feature_w, aff):
            out += w * a
        if len(aff) >= 2:
            out += 0.75 * aff[0] * aff[1]
        return out

    def labels(self, batch: Batch, rng: np.random.Generator) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-self.logits(batch)))
        return (rng.random(p.shape[0]) < p).astype(np.float32)  # [B]
