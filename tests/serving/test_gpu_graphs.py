"""On a GPU, shards and the tower replay CUDA graphs captured at start: their lookups and
scores equal the CPU's, and a bad id still raises the typed error. Skipped without a GPU.

The packages have seeded random weights (export --init random): no training, no torchrec,
so these tests run on a GPU host that has neither."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels import IndexOutOfRangeError
from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.engine.routing import Routing, ShardRequest
from serving.engine.shard import ShardCore
from serving.engine.tower import TowerCore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def random_packages(tiny, tmp_path_factory):
    from recserve.planning import plan_workload
    from recserve.random_init import export_random_package

    root = tmp_path_factory.mktemp("random-tiny")
    made = {}

    def get(layout: str):
        if layout not in made:
            strategy, n = layout.split("-")
            plan = plan_workload(tiny, strategy=strategy, num_shards=int(n))
            made[layout] = export_random_package(tiny, root / layout, plan=plan, seed=3, progress=False).path
        return made[layout]

    return get


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16])
def test_graph_replays_equal_the_cpu_lookup_and_scores(tiny, random_packages, output_dtype):
    pkg = ModelPackage.open(random_packages("table-2"))
    routing = Routing(pkg.manifest)
    gpu = {k: ShardCore(pkg, k, device="cuda", max_batch_size=16, output_dtype=output_dtype) for k in routing.columns}
    cpu = {k: ShardCore(pkg, k, output_dtype=output_dtype) for k in routing.columns}
    assert all(len(s.graphs) == len(s.buckets) > 0 for s in gpu.values())
    tower_gpu = TowerCore.from_package(pkg, device="cuda", max_batch_size=16, input_dtype=output_dtype)
    tower_cpu = TowerCore.from_package(pkg)
    assert len(tower_gpu.graphs) == len(tower_gpu.buckets)
    gen = TrafficGenerator(tiny, seed=8, empty_bag_fraction=0.2)
    for B in (1, 5, 16, 40, 9):  # 40: above every bucket, eager
        batch = gen.batch(B)
        requests = routing.split(batch)
        got = {k: gpu[k].lookup(r) for k, r in requests.items()}
        want = {k: cpu[k].lookup(r) for k, r in requests.items()}
        for k in requests:
            np.testing.assert_allclose(got[k].astype(np.float32), want[k].astype(np.float32), rtol=1e-3, atol=1e-3)
        sparse = routing.assemble(B, {k: v.astype(np.float32) for k, v in want.items()})
        np.testing.assert_allclose(tower_gpu.score(batch.dense, sparse), tower_cpu.score(batch.dense, sparse),
                                   rtol=1e-4, atol=1e-5)


def test_a_bad_id_raises_from_a_graph_replay(tiny, random_packages):
    pkg = ModelPackage.open(random_packages("singular-1"))
    core = ShardCore(pkg, 0, device="cuda", max_batch_size=8)
    good = Routing(pkg.manifest).split(TrafficGenerator(tiny, seed=2).batch(4))[0]
    values = good.values.copy()
    values[0] = -1
    with pytest.raises(IndexOutOfRangeError):
        core.lookup(ShardRequest(lengths=good.lengths, values=values))
    np.testing.assert_allclose(core.lookup(good), ShardCore(pkg, 0).lookup(good), rtol=1e-5, atol=1e-6)


def test_the_monolith_on_a_gpu_scores_as_on_the_cpu(tiny, random_packages):
    from serving.engine.local_ranker import LocalRanker

    pkg = ModelPackage.open(random_packages("table-2"))
    gpu, cpu = LocalRanker.load(pkg, device="cuda", max_batch_size=16), LocalRanker.load(pkg)
    gen = TrafficGenerator(tiny, seed=4)
    for B in (1, 7, 16):
        batch = gen.batch(B)
        np.testing.assert_allclose(gpu.score(batch), cpu.score(batch), rtol=1e-4, atol=1e-5)
