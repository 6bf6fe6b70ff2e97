"""TowerCore: a float16/bfloat16 tower stays within its stated bound of the float32 tower,
and padding a batch to its bucket never changes its scores (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.engine.local_ranker import LocalRanker
from serving.engine.tower import LOWP_SCORE_BOUND, TowerCore


@pytest.fixture(scope="module")
def inputs(tiny, tiny_packages):
    """(package, [(dense [B, F_dense], sparse float32 [B, F, D])]) of real traffic."""
    pkg = ModelPackage.open(tiny_packages("singular-1"))
    ranker = LocalRanker.load(pkg)
    gen = TrafficGenerator(tiny, seed=21, empty_bag_fraction=0.2)
    out = []
    for B in (1, 3, 8, 13, 64, 64, 64, 64):
        batch = gen.batch(B)
        parts = {k: ranker.shards[k].lookup(r) for k, r in ranker.routing.split(batch).items()}
        out.append((batch.dense, ranker.routing.assemble(B, parts)))
    return pkg, out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_tower_stays_within_its_bound_of_float32(inputs, dtype):
    pkg, batches = inputs
    full, low = TowerCore.from_package(pkg), TowerCore.from_package(pkg, dtype=dtype)
    worst = max(float(np.abs(low.score(d, s) - full.score(d, s)).max()) for d, s in batches)
    assert 0 < worst <= LOWP_SCORE_BOUND[dtype]  # > 0: the tower really ran in the low dtype


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_the_tower_accepts_pooled_embeddings_in_a_16_bit_wire_dtype(inputs, wire):
    pkg, batches = inputs
    tower = TowerCore.from_package(pkg, pad=True, max_batch_size=8)
    for d, s in batches:
        np.testing.assert_array_equal(tower.score(d, s.to(wire)), tower.score(d, s.to(wire).float()))


def test_padded_scores_equal_unpadded_ones(inputs):
    pkg, batches = inputs
    plain = TowerCore.from_package(pkg)
    padded = TowerCore.from_package(pkg, pad=True, max_batch_size=8)
    assert [b.batch for b in padded.buckets] == [1, 2, 4, 8]
    for d, s in batches:  # 13 and 64 are above every bucket: eager
        np.testing.assert_allclose(padded.score(d, s), plain.score(d, s), rtol=1e-6, atol=1e-7)
