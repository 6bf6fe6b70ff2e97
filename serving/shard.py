"""One embedding shard: its tables' row slices from its own shard file, one table-batched
lookup over all of them. Ray-free; the Serve deployment in deployments.py wraps it."""

from __future__ import annotations

import numpy as np
import torch

from kernels.embedding_bag import TableBatchedEmbeddingBag, TableWeights
from recserve.package import ModelPackage
from serving.routing import Column, Routing, ShardRequest, concat_requests


class ShardCore:
    """Shard ``index`` of a package, ready to look up.

    Loads and verifies only ``shards/shard-{index}.safetensors``. Lookup columns follow
    :class:`Routing` (one per served feature per slice; a table read by two features is
    packed twice). Ids arrive global and are rebased here: id ``i`` of a slice starting at
    ``row_start`` is row ``i - row_start``.
    """

    def __init__(self, package: ModelPackage, index: int, *, device: str = "cpu", backend: str = "auto"):
        self.index = index
        self.columns: tuple[Column, ...] = Routing(package.manifest).columns[index]
        slices = {(s.table, s.row_start): s for s in package.load_shard(index)}
        self.device = torch.device(device)
        self.output_dim = sum(c.dim for c in self.columns)  # columns x D
        self._row_start = np.array([c.row_start for c in self.columns], np.int64)  # [C]
        self.lookup_kernel = None
        if self.columns:
            tables = []
            for c in self.columns:
                s = slices[(c.table, c.row_start)]
                tables.append(TableWeights(weight=s.weight, dim=s.dim, dtype=s.dtype, scale=s.scale, bias=s.bias))
            self.lookup_kernel = TableBatchedEmbeddingBag(tables, pooling="sum", device=self.device, backend=backend)
            self.warmup()

    def warmup(self) -> None:
        """One lookup of every column at batch sizes 1 and 8 (kernels chosen and compiled now)."""
        for B in (1, 8):
            C = len(self.columns)
            self.lookup(ShardRequest(lengths=np.ones((C, B), np.int32), values=np.repeat(self._row_start, B)))

    def lookup(self, request: ShardRequest) -> np.ndarray:
        """Pooled embeddings of every column: float32 [B, C * D] (columns in shard order)."""
        B = request.batch_size
        if self.lookup_kernel is None or request.num_ids == 0:
            return np.zeros((B, self.output_dim), np.float32)
        per_column = request.lengths.sum(axis=1)  # [C] ids per column
        local = request.values - np.repeat(self._row_start, per_column)  # [N] rows within each slice
        offsets = np.zeros(request.lengths.size + 1, np.int64)  # [C*B + 1]
        np.cumsum(request.lengths.reshape(-1), out=offsets[1:])
        indices = torch.from_numpy(local).to(self.device)
        offs = torch.from_numpy(offsets).to(self.device)
        psw = None if request.weights is None else torch.from_numpy(request.weights).to(self.device)
        with torch.no_grad():
            pooled = self.lookup_kernel(indices, offs, psw)  # [B, C * D]
        return pooled.cpu().numpy()

    def lookup_many(self, requests: list[ShardRequest]) -> list[np.ndarray]:
        """Several requests in one lookup (dynamic batching); one output per request."""
        if len(requests) == 1:
            return [self.lookup(requests[0])]
        merged = self.lookup(concat_requests(requests))  # [sum B, C * D]
        bounds = np.cumsum([r.batch_size for r in requests])[:-1]
        return np.split(merged, bounds)
