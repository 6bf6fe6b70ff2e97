"""Where the replicas run on a Ray cluster of several hosts (``AppArgs.place_on_hosts``).

A host is a Ray node started with a ``recserve-host`` label and a memory budget for shard
replicas (Ray's ``memory`` resource)::

    ray start --address HEAD:6379 --labels recserve-host=h1 --memory 300000000000

:func:`node_placement` reads the hosts and budgets of the cluster (``ray.nodes()``), puts each
shard's replicas on hosts with room (sharding/hosts.py ``assign_hosts``; replicas of one shard
on different hosts) and turns that into Ray actor options:

- shard replica: ``label_selector`` = its planned host(s), ``memory`` = its shard's bytes
  (Ray never puts more shards on a host than its budget holds), ``max_replicas_per_node = 1``
  (two replicas of a shard never share a host); ``fallback_strategy`` = any host: when a
  host is lost, Serve starts its replicas again on another host with room, and they come back
  to the planned host only on a redeploy.
- router and tower: on the host the user names (``router_host``, ``tower_host``), else
  anywhere.

A package that does not fit the hosts is refused before any replica starts, with the
planner's message naming the table (:class:`sharding.PlannerError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sharding.hosts import HOST_LABEL, HostAssignment, assign_hosts
from sharding.types import PlannerError, PlannerErrorType, ShardPlan


def _selector(hosts) -> dict[str, str]:
    return {HOST_LABEL: f"in({','.join(hosts)})"}


@dataclass(frozen=True, kw_only=True)
class NodePlacement:
    """Ray options per deployment for a placement over hosts (empty: no node placement)."""

    assignment: HostAssignment | None = None
    shard_bytes: tuple[int, ...] = ()  # per shard: the Ray memory each replica asks for
    router_host: str = ""
    tower_host: str = ""
    hosts: tuple[str, ...] = field(default=())

    def shard_options(self, index: int) -> dict[str, Any]:
        """``ray_actor_options`` of shard ``index`` (merged into the app's)."""
        if self.assignment is None:
            return {}
        return {"label_selector": _selector(dict.fromkeys(self.assignment.shards[index])),
                "fallback_strategy": [{"label_selector": _selector(self.hosts)}],
                "memory": self.shard_bytes[index]}

    def shard_deployment_options(self) -> dict[str, Any]:
        """Deployment options of every shard: one replica of a shard per host."""
        return {"max_replicas_per_node": 1} if self.assignment is not None else {}

    def router_options(self) -> dict[str, Any]:
        return {"label_selector": _selector([self.router_host])} if self.router_host else {}

    def tower_options(self) -> dict[str, Any]:
        return {"label_selector": _selector([self.tower_host])} if self.tower_host else {}


NO_NODES = NodePlacement()


def cluster_hosts() -> dict[str, int]:
    """Host name -> Ray ``memory`` (bytes) of the alive nodes labelled ``recserve-host``, in
    name order. Needs a connected Ray driver. ValueError when two nodes share a name."""
    import ray

    hosts: dict[str, int] = {}
    for node in ray.nodes():
        name = (node.get("Labels") or {}).get(HOST_LABEL)
        if not node["Alive"] or name is None:
            continue
        if name in hosts:
            raise ValueError(f"two alive Ray nodes carry the label {HOST_LABEL}={name}: name each host once")
        hosts[name] = int(node["Resources"].get("memory", 0))
    return dict(sorted(hosts.items()))


def node_placement(shard_plan: ShardPlan, hosts: dict[str, int], *, shard_replicas: int = 1,
                   router_host: str = "", tower_host: str = "") -> NodePlacement:
    """The placement of ``shard_plan`` over ``hosts`` (name -> bytes for shard replicas).

    PlannerError naming the table when the shards do not fit (INSUFFICIENT_MEMORY), or naming
    the router/tower host when it is not one of ``hosts`` (INVALID_INPUT)."""
    for what, host in (("router_host", router_host), ("tower_host", tower_host)):
        if host and host not in hosts:
            raise PlannerError(f"{what}: no alive Ray node is labelled {HOST_LABEL}={host} "
                               f"(hosts: {', '.join(hosts) or 'none'})", PlannerErrorType.INVALID_INPUT)
    assignment = assign_hosts(shard_plan, hosts, shard_replicas=shard_replicas)
    return NodePlacement(assignment=assignment, shard_bytes=tuple(sh.bytes for sh in shard_plan.shards),
                         router_host=router_host, tower_host=tower_host, hosts=tuple(hosts))


def actor_node() -> dict[str, Any]:
    """Where the calling Ray actor runs: its node id and that node's ``recserve-host`` label."""
    import os

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    labels = next((n.get("Labels") or {} for n in ray.nodes() if n["NodeID"] == node_id), {})
    return {"node_id": node_id, "host": labels.get(HOST_LABEL), "pid": os.getpid()}


def replica_nodes(app: str, *, timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> actor_node() of each running replica of Serve app ``app`` (a replica on
    a node lost since it was listed is left out). For checks and benchmarks."""
    from serving.ops.replicas import ask_replicas

    return ask_replicas(app, actor_node, timeout_s=timeout_s, skip_dead=True)
