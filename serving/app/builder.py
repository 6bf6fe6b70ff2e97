"""The Serve application, wired in one expression by a typed builder.

``deploy/serve.yaml`` names ``serving.app.builder:build_app``; ``recserve serve`` calls it too::

    Router.bind(package, [shard-0, ..., shard-N], DenseTower, args)

A versioned stack (serving/app/rollout.py: ``start_stack``, ``recserve deploy``) runs the same
deployments as one application per model version (``build_version_app``) plus a router
application (``build_router_app``).
"""

from __future__ import annotations

from ray.serve import Application

from recserve.package import Manifest, ModelPackage
from serving.config import AppArgs, replica_num_cpus
from recserve.default_package import resolve_package
from serving.app.deployments import DenseTower, Router, Shard, shard_name, transport_env
from serving.app.nodes import NO_NODES, NodePlacement, cluster_hosts, node_placement
from serving.app.placement import gpu_placement


def _resolved(args: AppArgs | dict) -> tuple[AppArgs, Manifest]:
    if isinstance(args, dict):
        args = AppArgs(**args)
    path = resolve_package(args.package)
    manifest = ModelPackage.open(path).manifest
    # replicas get the resolved path and device, never "default" or "auto"
    return args.model_copy(update={"package": str(path), "device": args.resolved_device()}), manifest


def _actor() -> dict:
    return {"num_cpus": replica_num_cpus(ray_node_cpus()), "runtime_env": {"env_vars": transport_env()}}


def ray_node_cpus() -> int:
    """The CPUs Ray gave its smallest live node (this machine's cores when Ray is not running):
    what a replica's CPU reservation must fit. Not os.cpu_count(): a Ray started with fewer CPUs
    than the host has (`ray start --num-cpus 2` on a 16-core GPU host, a test session's Ray)
    could not place 1-CPU replicas, and serve.run waited for them forever."""
    import os

    import ray

    if not ray.is_initialized():
        return os.cpu_count() or 1
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return int(min(cpus)) if cpus else 0


def _version_deployments(args: AppArgs, manifest: Manifest) -> tuple[list[Application], Application]:
    """One package's shard deployments and dense tower, bound (``args.package`` resolved)."""
    gpus = gpu_placement(shards=manifest.plan.num_shards, gpus=args.gpus, shard_replicas=args.shard_replicas,
                         tower=args.tower_gpu, tower_replicas=args.tower_replicas)  # gpus=0: no GPU shares
    nodes = _nodes(args, manifest)
    shards = [
        Shard.options(name=shard_name(sh.index), num_replicas=args.shard_replicas,
                      user_config=args.shard_batching.model_dump(), **nodes.shard_deployment_options(),
                      ray_actor_options=_actor() | gpus.shard_options() | nodes.shard_options(sh.index)).bind(
            args.package, sh.index, args)
        for sh in manifest.plan.shards
    ]
    # the shards are bound to the tower in every fan-out: with "tower" it calls them; as a version
    # application's ingress (build_version_app) it holds them in that application
    tower = DenseTower.options(num_replicas=args.tower_replicas, user_config=args.tower_batching.model_dump(),
                               ray_actor_options=_actor() | gpus.tower_options() | nodes.tower_options()).bind(
        args.package, shards, args)
    return shards, tower


def _nodes(args: AppArgs, manifest: Manifest) -> NodePlacement:
    """The placement over the cluster's hosts (place_on_hosts), or none; PlannerError naming the
    table when the package does not fit them."""
    if not args.place_on_hosts:
        return NO_NODES
    return node_placement(manifest.plan, cluster_hosts(), shard_replicas=args.shard_replicas,
                          router_host=args.router_host, tower_host=args.tower_host)


def _router(args: AppArgs, shards: list, tower) -> Application:
    nodes = NodePlacement(router_host=args.router_host)
    # the door: past its share of max_in_flight working + max_queued waiting, Serve refuses a request before
    # the router's Python runs (measured: without it, past the maximum the queue in front of the
    # router's loop grew until most requests waited out their deadlines; docs/reliability.md);
    # with grpc_listen Serve sees no request and the Router's own server keeps the same door
    # (serving/app/grpc_ingress.py)
    # router_max_replicas: Serve's autoscaler between the two, by requests in flight (InFlightPolicy)
    autoscaling = args.router_autoscaling()
    replicas = {"num_replicas": args.router_replicas} if autoscaling is None else {
        "num_replicas": "auto", "autoscaling_config": autoscaling}
    working, waiting = args.router_door()  # the stack's door, shared among the routers
    return Router.options(**replicas, ray_actor_options=_actor() | nodes.router_options(),
                          max_ongoing_requests=working, max_queued_requests=waiting).bind(
        args.package, shards, tower, args)


def build_app(args: AppArgs) -> Application:
    """The recserve app for ``args.package``: one deployment per shard, the tower, the router.

    The package is opened (manifest checked) here, so a bad package fails the deploy with
    the PackageError naming the file instead of starting replicas.
    """
    args, manifest = _resolved(args)
    shards, tower = _version_deployments(args, manifest)
    return _router(args, shards, tower)


def build_version_app(args: AppArgs) -> Application:
    """One model version's application (serving/app/rollout.py): its dense tower as the ingress,
    its shards bound to it; the router of the stack calls them by name. (Until 2026-12-06 an
    idle VersionFront deployment was the ingress: a process of its own, ~14 ms of CPU a
    second doing nothing.)"""
    args, manifest = _resolved(args)
    _, tower = _version_deployments(args, manifest)
    return tower


def build_router_app(args: AppArgs) -> Application:
    """The router application of a versioned stack: the Router alone; it finds the versions'
    shards and towers through the version table (serving/app/versions.py)."""
    args, _ = _resolved(args)
    return _router(args, [], None)
