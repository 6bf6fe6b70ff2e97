"""The Serve application, wired in one expression by a typed builder.

``deploy/serve.yaml`` names ``serving.app:build_app``; ``recserve serve`` calls it too::

    Router.bind(package, [shard-0, ..., shard-N], DenseTower, args)
"""

from __future__ import annotations

from ray.serve import Application

from recserve.package import ModelPackage
from serving.config import AppArgs, replica_num_cpus
from serving.default_model import resolve_package
from serving.deployments import DenseTower, Router, Shard, shard_name, transport_env
from serving.placement import gpu_placement


def build_app(args: AppArgs) -> Application:
    """The recserve app for ``args.package``: one deployment per shard, the tower, the router.

    The package is opened (manifest checked) here, so a bad package fails the deploy with
    the PackageError naming the file instead of starting replicas.
    """
    if isinstance(args, dict):
        args = AppArgs(**args)
    path = resolve_package(args.package)
    manifest = ModelPackage.open(path).manifest
    # replicas get the resolved path and device, never "default" or "auto"
    args = args.model_copy(update={"package": str(path), "device": args.resolved_device()})
    actor = {"num_cpus": replica_num_cpus(), "runtime_env": {"env_vars": transport_env()}}  # fits this machine
    gpus = gpu_placement(shards=manifest.plan.num_shards, gpus=args.gpus, shard_replicas=args.shard_replicas,
                         tower=args.tower_gpu, tower_replicas=args.tower_replicas)  # gpus=0: no GPU shares
    shards = [
        Shard.options(name=shard_name(sh.index), num_replicas=args.shard_replicas,
                      user_config=args.shard_batching.model_dump(),
                      ray_actor_options=actor | gpus.shard_options()).bind(str(path), sh.index, args)
        for sh in manifest.plan.shards
    ]
    tower = DenseTower.options(num_replicas=args.tower_replicas, user_config=args.tower_batching.model_dump(),
                               ray_actor_options=actor | gpus.tower_options()).bind(
        str(path), shards if args.resolved_fanout() == "tower" else [], args)
    return Router.options(num_replicas=args.router_replicas, ray_actor_options=actor).bind(
        str(path), shards, tower, args)
