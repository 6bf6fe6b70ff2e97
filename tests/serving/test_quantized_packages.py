"""fp16, bf16, int8 and int4 packages of the trained tiny model, served by the monolith and by
Ray Serve: each scores exactly as the torchrec model of the values it stores, and within the
storage error bound (propagated to the score) of the fp32 model."""

from __future__ import annotations

import numpy as np
import pytest
from tests.serving.package_models import storage_score_bound, torchrec_scores

from recserve.batch import Batch
from recserve.synth import TrafficGenerator

TOL = 1e-5  # serving vs torchrec on the same fp32 values (as every other parity test)
SERVED_DTYPES = ["fp16", "int8", "int4"]


@pytest.fixture(scope="module")
def packages(tmp_path_factory, tiny, tiny_state_dict):
    """dtype -> the trained tiny model exported in that dtype (load strategy, 2 shards, t_item split)."""
    from recserve.export import export_package
    from recserve.planning import plan_workload

    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def get(dtype: str):
        if dtype not in made:
            plan = plan_workload(tiny, strategy="load", num_shards=2, shard_memory=100_000, dtype=dtype)
            made[dtype] = export_package(tiny, tiny_state_dict, root / dtype, plan=plan, progress=False).path
        return made[dtype]

    return get


@pytest.fixture(scope="module")
def batch(tiny) -> Batch:
    return TrafficGenerator(tiny, seed=31, empty_bag_fraction=0.2).batch(40)


@pytest.fixture(scope="module")
def fp32(tiny_state_dict, tiny, batch):
    """The trained fp32 torchrec model, its scores of ``batch`` and, per dtype, the bound."""
    import torch

    from recserve.model import build_model, predict

    model = build_model(tiny)
    model.load_state_dict(torch.load(tiny_state_dict, weights_only=True))
    model.eval()
    bounds = {d: storage_score_bound(model, tiny.features, batch, d) + TOL for d in ("fp16", "bf16", "int8", "int4")}
    return predict(model, batch, tiny.features), bounds


def _check(got: np.ndarray, dtype: str, package, batch: Batch, fp32) -> float:
    """Served scores equal the stored model's (TOL) and lie within the bound of fp32's; returns the error."""
    np.testing.assert_allclose(got, torchrec_scores(package, batch), rtol=0, atol=TOL,
                               err_msg=f"{dtype}: served vs the torchrec model of the stored values")
    scores, bounds = fp32
    err = np.abs(got - scores)
    assert np.all(err <= bounds[dtype]), f"{dtype}: error {err.max():.2e}, bound {bounds[dtype][err.argmax()]:.2e}"
    return float(err.max())


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int4"])
def test_the_monolith_serves_each_dtype_within_its_storage_bound_of_fp32(dtype, packages, batch, fp32, helpers):
    from serving.api.client import RankingClient
    from serving.standalone.monolith import MonolithThread

    with MonolithThread(str(packages(dtype)), port=0, max_batch_size=helpers.max_batch) as srv:
        with RankingClient(f"127.0.0.1:{srv.port}") as client:
            got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)
    assert _check(got, dtype, packages(dtype), batch, fp32) > 0  # storage does move the scores


@pytest.mark.parametrize("dtype", SERVED_DTYPES)
def test_ray_serve_serves_each_dtype_within_its_storage_bound_of_fp32(dtype, packages, batch, fp32, deploy, helpers):
    # float32 pooled embeddings on the wire: the storage dtype is the only rounding
    client = deploy(packages(dtype), f"quantized-{dtype}", max_batch_size=helpers.max_batch, wire_dtype="float32")
    got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=60)
    _check(got, dtype, packages(dtype), batch, fp32)


def test_the_bounds_order_as_the_storage_precision_and_are_not_loose(packages, batch, fp32):
    scores, bounds = fp32
    worst = {d: bounds[d].max() for d in ("fp16", "int8", "int4")}
    assert worst["fp16"] < worst["int8"] < worst["int4"]
    moved = np.abs(torchrec_scores(packages("int4"), batch) - scores).max()
    assert moved > worst["int4"] / 100  # within two orders of magnitude of the bound
