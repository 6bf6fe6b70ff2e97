"""Where the shard and tower replicas run: Ray GPU shares for ``AppArgs.gpus``.

``gpus = 0`` (default): no GPU resources are requested; every replica uses ``device`` as it
finds it (one GPU, or the CPU), as before. ``gpus = N``: each replica asks Ray for a share of
one GPU, and Ray sets its CUDA_VISIBLE_DEVICES to that GPU, so ``cuda`` in the replica is
its own GPU. With S shards x R replicas on G shard GPUs (G = N, or N minus the towers'
GPUs with ``tower_gpu = "own"``), at most k = ceil(S x R / G) shard replicas share a GPU:

- shard replica: ``num_gpus = (1 - towers x TOWER_SHARE) / k`` ("shared") or ``1 / k`` ("own"),
  rounded down to Ray's 1e-4 resource granularity. k + 1 of them exceed one GPU, so no GPU
  ever holds more than k: the planner's per-shard budget (sharding/gpus.py) holds wherever
  Ray puts them. Ray fills a GPU's fractional shares before it starts the next, so k shard
  replicas land on each GPU (which shard lands where is Ray's choice).
- tower replica: ``TOWER_SHARE`` of a GPU beside the shards ("shared"; the shards leave that
  much free on every GPU) or a whole GPU ("own").
- router: no GPU.

Example: 2 shards, 1 replica each, 2 GPUs, tower shared: shards 0.99 each (one per GPU), the
tower 0.01 on one of them. 4 shards on 2 GPUs: 0.495 each, two per GPU.

Replicas added later (autoscaling, ops) ask for the same share: beyond S x R shard replicas
they wait for a GPU that has room (Serve reports them pending) instead of overfilling one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from sharding.gpus import TOWER_GPUS

TOWER_SHARE = 0.01  # of one GPU, for a tower replica beside the shards ("shared")
_GRAIN = 10_000  # Ray keeps resource quantities to 1e-4


@dataclass(frozen=True, kw_only=True)
class GpuPlacement:
    """Per-deployment GPU shares (``ray_actor_options["num_gpus"]``); 0 = no GPU requested."""

    shard_gpus: float  # share of one GPU per shard replica
    tower_gpus: float  # share of one GPU per tower replica (1.0 = a GPU of its own)
    shards_per_gpu: int  # most shard replicas on one GPU (0: no GPU placement)

    def shard_options(self) -> dict[str, Any]:
        return {"num_gpus": self.shard_gpus} if self.shard_gpus else {}

    def tower_options(self) -> dict[str, Any]:
        return {"num_gpus": self.tower_gpus} if self.tower_gpus else {}


NO_GPUS = GpuPlacement(shard_gpus=0.0, tower_gpus=0.0, shards_per_gpu=0)


def _floor_grain(x: float) -> float:
    return math.floor(x * _GRAIN) / _GRAIN


def gpu_placement(
    *, shards: int, gpus: int, shard_replicas: int = 1, tower: str = "shared", tower_replicas: int = 1
) -> GpuPlacement:
    """GPU shares for ``shards`` shard deployments of ``shard_replicas`` replicas each and the
    tower over ``gpus`` GPUs (0 = no GPU placement). ValueError naming the argument otherwise."""
    for name, value in (("shards", shards), ("shard_replicas", shard_replicas), ("tower_replicas", tower_replicas)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if gpus < 0:
        raise ValueError(f"gpus: must be >= 0, got {gpus}")
    if tower not in TOWER_GPUS:
        raise ValueError(f"tower_gpu: must be one of {TOWER_GPUS}, got {tower!r}")
    if gpus == 0:
        return NO_GPUS
    if tower == "own":
        shard_gpus = gpus - tower_replicas
        if shard_gpus < 1:
            raise ValueError(f"tower_gpu 'own': {tower_replicas} tower replica(s) on GPUs of their own leave none "
                             f"of {gpus} GPU(s) for the shards; use tower_gpu 'shared' or more GPUs")
        free, tower_share = 1.0, 1.0
    else:
        shard_gpus, free, tower_share = gpus, 1.0 - tower_replicas * TOWER_SHARE, TOWER_SHARE
    k = math.ceil(shards * shard_replicas / shard_gpus)
    share = _floor_grain(free / k)
    if share <= 1.0 / (k + 1):  # k + 1 replicas would fit on one GPU: the budget would not hold
        raise ValueError(f"gpus: {shards} shard(s) x {shard_replicas} replica(s) and {tower_replicas} tower(s) "
                         f"are too many for {gpus} GPU(s) ({k} per GPU); use more GPUs or fewer shards")
    return GpuPlacement(shard_gpus=share, tower_gpus=tower_share, shards_per_gpu=k)


def actor_gpu_ids() -> dict[str, Any]:
    """Where the calling Ray actor runs: Ray's GPU ids for it and its CUDA_VISIBLE_DEVICES."""
    import ray

    return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


def replica_gpus(app: str, *, timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> actor_gpu_ids() of each of its running replicas in Serve app ``app``
    (serving/ops/replicas.py; needs a connected Ray driver). For checks and benchmarks, never on
    the request path."""
    from serving.ops.replicas import ask_replicas

    return ask_replicas(app, actor_gpu_ids, timeout_s=timeout_s)
