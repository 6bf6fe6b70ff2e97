"""The API's bound on dense values and per-id weights (|x| <= MAX_ABS_DENSE) keeps every
bundled workload's scores finite: a request at the bound is scored, never answered NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.batch import Bags, Batch
from recserve.workloads import BUNDLED, load_workload
from serving.api.codec import MAX_ABS_DENSE
from serving.engine.local_ranker import LocalRanker

B = 6
ROWS = 8  # tables capped: the bound is about the dense arithmetic, not the table sizes


@pytest.fixture(scope="module", params=BUNDLED)
def ranker(request, tmp_path_factory):
    """The workload's model at torchrec's initialisation, exported and loaded like a served package."""
    from recserve.export import export_package
    from recserve.model import build_model
    from recserve.planning import plan_workload

    workload = load_workload(request.param).with_max_rows(ROWS)
    root = tmp_path_factory.mktemp(f"bound-{request.param}")
    torch.manual_seed(0)
    torch.save(build_model(workload).state_dict(), root / "state.pt")
    plan = plan_workload(workload, strategy="table", num_shards=2)
    package = export_package(workload, root / "state.pt", root / "package", plan=plan, progress=False)
    return workload, LocalRanker.load(package.path)


def test_scores_are_finite_with_dense_values_and_weights_at_the_bound(ranker):
    workload, local = ranker
    signs = np.array([1, -1, 1, -1, 1, -1], np.float32)[:, None]
    dense = np.full((B, workload.dense_features), MAX_ABS_DENSE, np.float32) * signs  # [B, F]
    dense[2, ::2] *= -1  # mixed signs within an example
    dense[3] = 0.0
    lengths = np.array([0, 1, 5, 20, 100, 1], np.int32)  # up to dlrmv2's longest bags
    sparse = {}
    for t in workload.tables:
        for f in t.features:
            ids = np.arange(lengths.sum(), dtype=np.int64) % t.rows
            sparse[f] = Bags(ids, lengths, np.full(ids.size, MAX_ABS_DENSE, np.float32))
    for batch in (Batch(dense, sparse), Batch(dense, {f: Bags(b.values, b.lengths) for f, b in sparse.items()})):
        scores = local.score(batch)
        assert np.isfinite(scores).all(), scores
        assert ((scores >= 0) & (scores <= 1)).all()
