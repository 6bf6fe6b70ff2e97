"""The whole model in one process: decode -> feature filter -> split -> shards -> tower.

This is the single-server path (serving/standalone/monolith.py) and the reference composition of the
cores; the Ray Serve app (deployments.py) runs the same steps with each shard and the
tower in their own deployments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from recserve.batch import Batch
from recserve.package import ModelPackage
from serving.api.codec import ModelSpec
from serving.config import DEFAULT_MAX_BATCH_SIZE
from serving.engine.routing import FeatureFilter, Routing, identity_filter, observe_scores
from serving.engine.shard import ShardCore
from serving.engine.tower import TowerCore


@dataclass
class LocalRanker:
    """Every shard and the tower of one package, in this process."""

    package: ModelPackage
    spec: ModelSpec
    routing: Routing
    shards: dict[int, ShardCore]
    tower: TowerCore
    feature_filter: FeatureFilter = identity_filter
    _device_index: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # shard -> [C] on the GPU

    @staticmethod
    def load(
        package: ModelPackage | str,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        device: str = "cpu",
        backend: str = "auto",
        feature_filter: FeatureFilter = identity_filter,
    ) -> LocalRanker:
        if not isinstance(package, ModelPackage):
            package = ModelPackage.open(package)
        m = package.manifest
        return LocalRanker(
            package=package,
            spec=ModelSpec.of(m, max_batch_size=max_batch_size),
            routing=Routing(m),
            shards={sh.index: ShardCore(package, sh.index, device=device, backend=backend,
                                        max_batch_size=max_batch_size) for sh in m.plan.shards},
            tower=TowerCore.from_package(package, device=device, backend=backend, max_batch_size=max_batch_size),
            feature_filter=feature_filter,
        )

    def score(self, batch: Batch) -> np.ndarray:
        """Scores float32 [B] of a validated batch.

        On a GPU the pooled embeddings never leave it: each shard's lookup stays on the device
        (no sync), they are assembled there, and the tower's scores are the one copy back; the
        shards' id flags are read after it."""
        started = time.perf_counter()
        batch = self.feature_filter(batch)  # the fading hook: before the split
        scores = self.score_filtered(batch)
        observe_scores(self.feature_filter, batch, scores, time.perf_counter() - started)  # fading guardrails
        return scores

    def score_filtered(self, batch: Batch, observe: Callable[[str, float], None] | None = None) -> np.ndarray:
        """Scores float32 [B] of a batch the feature filter has seen (e.g. several requests'
        batches, each filtered, coalesced into one); ``observe(stage, ms)`` gets the time of
        the lookups ("lookup") and of the tower ("tower") on the CPU path."""
        requests = self.routing.split(batch)
        if self.tower.device.type == "cuda":
            pooled = {k: self.shards[k].lookup_device(r) for k, r in requests.items()}  # (pooled, flag)
            sparse = self._assemble_on_device(batch.batch_size, {k: p for k, (p, _) in pooled.items()})
            scores = self.tower.score(batch.dense, sparse)  # [B]; the one sync
            for k, (_, flag) in pooled.items():
                self.shards[k].check_ids(requests[k], flag)
        else:
            t0 = time.perf_counter()
            outputs = {k: self.shards[k].lookup(r) for k, r in requests.items()}
            t1 = time.perf_counter()
            sparse = self.routing.assemble(batch.batch_size, outputs)  # [B, F, D]
            scores = self.tower.score(batch.dense, sparse)
            if observe is not None:
                observe("lookup", (t1 - t0) * 1000)
                observe("tower", (time.perf_counter() - t1) * 1000)
        return scores

    def _assemble_on_device(self, B: int, parts: dict[int, torch.Tensor]) -> torch.Tensor:
        """Routing.assemble on the tower's device: float32 [B, F, D] from shard outputs there."""
        device = self.tower.device
        sparse = torch.zeros(B, len(self.routing.features), self.routing.dim, device=device)  # [B, F, D]
        for k, out in parts.items():
            index = self._device_index.get(k)
            if index is None:  # made once: a host-to-device copy per request would wait for the GPU
                index = self._device_index[k] = torch.tensor(
                    [c.feature_index for c in self.routing.columns[k]], device=device)
            sparse.index_add_(1, index, out.view(B, -1, self.routing.dim).float())
        return sparse
