"""GPU shares of the shard and tower replicas (AppArgs.gpus): Ray can never put more shard
replicas on one GPU than the planner budgeted for."""

from __future__ import annotations

import math

import pytest

from serving.app.builder import build_app
from serving.config import AppArgs
from serving.app.placement import NO_GPUS, TOWER_SHARE, gpu_placement


def test_no_gpus_requests_no_gpu_resources():
    assert gpu_placement(shards=3, gpus=0) == NO_GPUS
    assert NO_GPUS.shard_options() == {} and NO_GPUS.tower_options() == {}


@pytest.mark.parametrize(("shards", "gpus", "replicas"), [(1, 1, 1), (2, 2, 1), (4, 2, 1), (3, 2, 1), (8, 4, 1),
                                                          (2, 4, 2), (5, 4, 3), (64, 8, 1)])
@pytest.mark.parametrize("tower", ["shared", "own"])
def test_a_gpu_holds_at_most_shards_per_gpu_replicas_and_the_towers(shards, gpus, replicas, tower):
    if tower == "own" and gpus == 1:
        with pytest.raises(ValueError, match="leave none"):
            gpu_placement(shards=shards, gpus=gpus, shard_replicas=replicas, tower=tower)
        return
    p = gpu_placement(shards=shards, gpus=gpus, shard_replicas=replicas, tower=tower)
    shard_gpus = gpus - 1 if tower == "own" else gpus
    k = math.ceil(shards * replicas / shard_gpus)
    assert p.shards_per_gpu == k
    assert p.shard_gpus * k + (TOWER_SHARE if tower == "shared" else 0) <= 1.0  # k shards and the tower fit
    assert p.shard_gpus * (k + 1) > 1.0  # k + 1 shards never do
    assert p.shard_gpus * shards * replicas <= shard_gpus  # all shard replicas fit the shard GPUs
    assert p.tower_gpus == (1.0 if tower == "own" else TOWER_SHARE)
    assert round(p.shard_gpus * 10_000) == p.shard_gpus * 10_000  # Ray's 1e-4 resource grain


def test_build_app_puts_the_shares_in_each_deployments_actor_options(tiny_packages):
    app = build_app(AppArgs(package=str(tiny_packages("table-4")), gpus=2, device="cpu"))
    router = app._bound_deployment
    shards, tower = router.init_args[1], router.init_args[2]
    assert [s._bound_deployment.ray_actor_options["num_gpus"] for s in shards] == [0.495] * 4
    assert tower._bound_deployment.ray_actor_options["num_gpus"] == TOWER_SHARE
    assert "num_gpus" not in router.ray_actor_options
    plain = build_app(AppArgs(package=str(tiny_packages("table-4"))))._bound_deployment
    assert all("num_gpus" not in s._bound_deployment.ray_actor_options for s in plain.init_args[1])
