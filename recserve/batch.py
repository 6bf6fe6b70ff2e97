"""The batch of examples that flows through training, the client and serving.

Sparse features are jagged: for each feature, the ids of all examples packed into one
array, and one length per example. Example with B=3 examples of feature ``recent_items``::

    values  = [7, 9, 4, 1]      # int64 [N]; example 0 has ids 7, 9; example 1 none; 2 has 4, 1
    lengths = [2, 0, 2]         # int32 [B]; sum(lengths) == N
    weights = None              # or float32 [N], one weight per id (weighted sum pooling)

This is the layout of a torchrec ``KeyedJaggedTensor`` for one key and of the gRPC API.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Bags:
    """One sparse feature over a batch."""

    values: np.ndarray  # int64 [N]
    lengths: np.ndarray  # int32 [B]
    weights: np.ndarray | None = None  # float32 [N]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    @staticmethod
    def empty(batch_size: int) -> Bags:
        return Bags(np.zeros(0, np.int64), np.zeros(batch_size, np.int32))


@dataclass(frozen=True)
class Batch:
    """B examples: dense features, sparse features by name, optional unit ids."""

    dense: np.ndarray  # float32 [B, F]
    sparse: dict[str, Bags] = field(default_factory=dict)
    unit_ids: np.ndarray | None = None  # uint64 [B] (e.g. the user), for consistent treatment

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def slice(self, start: int, stop: int) -> Batch:
        """Examples [start, stop) as a new batch (used to split and to check batching)."""
        sparse = {}
        for name, bags in self.sparse.items():
            offsets = np.concatenate([[0], np.cumsum(bags.lengths, dtype=np.int64)])
            lo, hi = offsets[start], offsets[stop]
            sparse[name] = Bags(
                bags.values[lo:hi],
                bags.lengths[start:stop],
                None if bags.weights is None else bags.weights[lo:hi],
            )
        units = None if self.unit_ids is None else self.unit_ids[start:stop]
        return Batch(self.dense[start:stop], sparse, units)

    def take(self, idx: np.ndarray) -> Batch:
        """Examples ``idx`` (int [b]) as a new batch, in that order (a jagged gather)."""
        sparse = {}
        for f, bags in self.sparse.items():
            offsets = np.cumsum(bags.lengths, dtype=np.int64) - bags.lengths  # [B] start of each bag
            lengths = bags.lengths[idx]  # [b]
            new_start = np.cumsum(lengths, dtype=np.int64) - lengths
            pos = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(offsets[idx] - new_start, lengths)  # [n]
            sparse[f] = Bags(bags.values[pos], lengths, None if bags.weights is None else bags.weights[pos])
        return Batch(self.dense[idx], sparse, None if self.unit_ids is None else self.unit_ids[idx])
