"""No hidden caps: a DLRMv2-shaped model (26 multi-hot features x dim 128, DCNv2; rows capped
so it fits CI) served sharded on Ray Serve takes every batch size the API accepts, up to
max_batch_size (4096), whatever the dynamic-batching settings, and scores it as torchrec does.

At B = 4096 a request carries ~880k ids and each shard hands the tower ~13 MB of float32
pooled embeddings: above both Serve's default dynamic batch (512 examples) and gRPC's default
4 MiB message limit, the two caps that used to fail such requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recserve.synth import TrafficGenerator
from recserve.workloads import load_workload

FP16_TOL = 5e-4  # float16 on the wire (the default), see test_ray_app.py
SIZES = (1, 700, 4096)


@pytest.fixture(scope="module")
def dlrmv2(tmp_path_factory):
    """(workload, package dir, torchrec model) of dlrmv2 with every table capped at 500 rows."""
    from recserve.export import export_package
    from recserve.model import build_model
    from recserve.planning import plan_workload

    workload = load_workload("dlrmv2").with_max_rows(500)
    torch.manual_seed(7)
    model = build_model(workload).eval()
    with torch.no_grad():  # torchrec's init makes every score alike: spread them so the check has teeth
        for key, p in model.named_parameters():
            if "embedding_bags" in key:
                p.uniform_(-0.5, 0.5)
            elif p.dim() == 2:
                p.normal_(0.0, (1.0 / p.shape[1]) ** 0.5)  # LeCun init
    root = tmp_path_factory.mktemp("dlrmv2-small")
    torch.save(model.state_dict(), root / "model.pt")
    plan = plan_workload(workload, strategy="load", num_shards=2)
    package = export_package(workload, root / "model.pt", root / "package", plan=plan, progress=False).path
    return workload, package, model


def test_dlrmv2_requests_up_to_the_max_batch_pass_every_deployment(dlrmv2, deploy, helpers):
    """The default app (router fan-out, shard results to the tower through the object store,
    float16 on the wire); by hand the tower fan-out over Serve's gRPC transport (whose 4 MiB
    limit used to fail these) gave the same scores at every size, float32 bit-equal."""
    from ray import serve

    from recserve.model import predict

    workload, package, model = dlrmv2
    name = "dlrmv2"
    # dynamic batches of 512 examples (the default) in shards and tower: 700 and 4096 run alone
    client = deploy(package, name, default_timeout_s=120.0)  # a B=4096 DCNv2 on a busy 2-core CPU is slow
    tol = FP16_TOL
    try:
        assert client.model_info().max_batch_size == 4096
        gen = TrafficGenerator(workload, seed=3)
        for B in SIZES:
            batch = gen.batch(B)
            got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=300)
            want = predict(model, batch, workload.features)
            assert got.shape == (B,)
            assert np.isfinite(got).all()
            assert B == 1 or want.std() > 1e-2, "the reference scores are all alike: the check would be weak"
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"{name}: B={B}")
            print(f"{name} B={B}: max |served - torchrec| = {np.abs(got - want).max():.2e}, score std {want.std():.3f}")
    finally:
        serve.delete(name)
