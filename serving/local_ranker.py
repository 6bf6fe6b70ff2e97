"""The whole model in one process: decode -> feature filter -> split -> shards -> tower.

This is the single-server path (serving/monolith.py) and the reference composition of the
cores; the Ray Serve app (deployments.py) runs the same steps with each shard and the
tower in their own deployments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from recserve.batch import Batch
from recserve.package import ModelPackage
from serving.codec import ModelSpec
from serving.config import DEFAULT_MAX_BATCH_SIZE
from serving.routing import FeatureFilter, Routing, identity_filter, observe_scores
from serving.shard import ShardCore
from serving.tower import TowerCore


@dataclass
class LocalRanker:
    """Every shard and the tower of one package, in this process."""

    package: ModelPackage
    spec: ModelSpec
    routing: Routing
    shards: dict[int, ShardCore]
    tower: TowerCore
    feature_filter: FeatureFilter = identity_filter

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
        """Scores float32 [B] of a validated batch."""
        started = time.perf_counter()
        batch = self.feature_filter(batch)  # the fading hook: before the split
        requests = self.routing.split(batch)
        outputs = {k: self.shards[k].lookup(r) for k, r in requests.items()}
        sparse = self.routing.assemble(batch.batch_size, outputs)  # [B, F, D]
        scores = self.tower.score(batch.dense, sparse)
        observe_scores(self.feature_filter, batch, scores, time.perf_counter() - started)  # fading guardrails
        return scores
