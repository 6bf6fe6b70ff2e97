"""Planning for several hosts (Ray nodes): each shard's memory budget from a host's, and
which host holds each shard replica.

Pure Python (no Ray, torch or CUDA). Serving (serving/app/nodes.py) reads each node's budget from
its Ray ``memory`` resource (``ray start --memory BYTES``) and places the replicas with
:func:`assign_hosts` over the nodes labelled ``recserve-host``, so the planner's budget and
the placement agree. The model of a host (all sizes in bytes)::

    host_memory
      - reserve.fraction x host_memory   Ray's object store (30% by default), OS, page cache
      - reserve.fixed                    the Python processes: raylet, workers, router, tower
      = room for shard replicas (the budget given to Ray: ``ray start --memory``)

``shards_per_host = ceil(num_shards x shard_replicas / hosts)``; each shard is capped at
``usable / shards_per_host``, so the replicas fit whichever hosts they land on as long as no
host holds more than ``shards_per_host`` of them (what :func:`assign_hosts` does when the plan
came from here). The replicas of one shard are always on different hosts.

Example: dlrmv2 at 10x its tables (~980 GB fp32) on hosts of 512 GB: usable
512 x 0.6 - 8 GiB = 298.6 GB; 4 hosts give 4 shards of <= 298.6 GB, one per host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from sharding.gpus import MAX_AUTO_SHARDS, GpuReserve
from sharding.planners import plan_within_budget
from sharding.types import PlannerError, PlannerErrorType, ShardPlan, TableSpec

HOST_LABEL = "recserve-host"  # Ray node label naming a host (ray start --labels recserve-host=NAME)
# Ray's object store takes 30% of a node's memory unless told otherwise; 10% more for the OS.
HOST_RESERVE = GpuReserve(fraction=0.40, fixed=8 * 2**30)


@dataclass(frozen=True, kw_only=True)
class HostTopology:
    """``hosts`` hosts of ``host_memory`` bytes each that hold the shard replicas."""

    hosts: int
    host_memory: int  # bytes per host
    shard_replicas: int = 1  # replicas per shard; each on a different host
    reserve: GpuReserve = HOST_RESERVE  # memory kept free of tables on every host

    def __post_init__(self) -> None:
        for name in ("hosts", "host_memory", "shard_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlannerError(f"{name}: must be an integer >= 1, got {value!r}", PlannerErrorType.INVALID_INPUT)
        if self.shard_replicas > self.hosts:
            raise PlannerError(f"shard_replicas: {self.shard_replicas} replicas of a shard need as many hosts "
                               f"(each on its own), only {self.hosts} given", PlannerErrorType.INVALID_INPUT)
        if self.usable_memory <= 0:
            raise PlannerError(f"host_memory: {self.host_memory:,} bytes leave nothing for tables after the reserve "
                               f"({self.reserve.bytes_of(self.host_memory):,} bytes)", PlannerErrorType.INVALID_INPUT)

    @property
    def usable_memory(self) -> int:
        """Bytes per host for shard replicas (what to give Ray: ``ray start --memory``)."""
        return self.host_memory - self.reserve.bytes_of(self.host_memory)

    def shards_per_host(self, num_shards: int) -> int:
        return math.ceil(num_shards * self.shard_replicas / self.hosts)

    def shard_memory(self, num_shards: int) -> int:
        """Per-shard cap (bytes) for a plan of ``num_shards`` shards on these hosts."""
        return self.usable_memory // self.shards_per_host(num_shards)

    def describe(self, num_shards: int) -> str:
        return (f"{self.hosts} host(s) x {self.host_memory:,} bytes, reserve {self.reserve.fraction:.0%} + "
                f"{self.reserve.fixed:,} bytes ({self.usable_memory:,} for shards: ray start --memory "
                f"{self.usable_memory}); {num_shards} shard(s) x {self.shard_replicas} replica(s): "
                f"{self.shards_per_host(num_shards)} per host, {self.shard_memory(num_shards):,} bytes each")


def plan_for_hosts(
    tables: Sequence[TableSpec], *, strategy: str, topology: HostTopology, num_shards: int | None = None
) -> ShardPlan:
    """Plan ``tables`` over ``topology``'s hosts, each shard capped at its share of a host.

    ``num_shards`` None: the smallest count (at least one per table for ``table``, up to
    MAX_AUTO_SHARDS) whose plan fits. Raises :class:`PlannerError` naming the table that fits
    nowhere, with the host budget in the message."""
    if num_shards is not None:
        counts = [num_shards]
    else:
        first = len(tables) if strategy == "table" else 1
        counts = list(range(first, max(first, MAX_AUTO_SHARDS) + 1))
    capacity = topology.hosts * topology.usable_memory

    def over_budget(error: PlannerError, counts: Sequence[int], total: int) -> PlannerError:
        tried = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}..{counts[-1]}"
        return PlannerError(
            f"{topology.hosts} host(s): cannot plan {tried} shard(s): {error.message} [host budget: "
            f"{topology.describe(counts[-1])}; the tables take {total:,} bytes x {topology.shard_replicas} "
            f"replica(s), the hosts hold {capacity:,}]",
            PlannerErrorType.INSUFFICIENT_MEMORY,
            {**error.details, "hosts": topology.hosts, "tables_bytes": total, "host_capacity": capacity},
        )

    return plan_within_budget(tables, strategy=strategy, counts=counts, shard_memory=topology.shard_memory,
                              replicas=topology.shard_replicas, capacity=capacity, over_budget=over_budget)


@dataclass(frozen=True, kw_only=True)
class HostAssignment:
    """Which hosts hold each shard's replicas: ``shards[k]`` = host names of shard k's replicas."""

    shards: tuple[tuple[str, ...], ...]
    budgets: dict[str, int]  # host -> bytes for shard replicas
    used: dict[str, int]  # host -> bytes the assignment puts there

    def __str__(self) -> str:
        lines = [f"{'host':>10}  {'budget':>14}  {'used':>14}  shards"]
        for host, budget in self.budgets.items():
            held = [f"shard-{k}" for k, hosts in enumerate(self.shards) if host in hosts]
            lines.append(f"{host:>10}  {budget:>14,}  {self.used[host]:>14,}  {' '.join(held) or '-'}")
        return "\n".join(lines)


def assign_hosts(shard_plan: ShardPlan, budgets: dict[str, int], *, shard_replicas: int = 1) -> HostAssignment:
    """Put each of ``shard_replicas`` replicas of every shard on its own host with room for it.

    ``budgets``: host name -> bytes for shard replicas (a node's Ray ``memory``). Largest shard
    first, each replica on the host with the most room left that does not hold that shard yet
    (ties: host order). Raises :class:`PlannerError` (INSUFFICIENT_MEMORY) naming the first
    table, in the shard's order, that no host has room for."""
    hosts = list(budgets)
    if not hosts:
        raise PlannerError(f"no hosts: label the Ray nodes that serve with {HOST_LABEL}=NAME "
                           f"(ray start --labels {HOST_LABEL}=NAME --memory BYTES)", PlannerErrorType.INVALID_INPUT)
    if shard_replicas < 1 or shard_replicas > len(hosts):
        raise PlannerError(f"shard_replicas: {shard_replicas} replicas of a shard need as many hosts (each on "
                           f"its own); the cluster has {len(hosts)}: {', '.join(hosts)}",
                           PlannerErrorType.INVALID_INPUT)
    free = dict(budgets)
    placed: dict[int, list[str]] = {sh.index: [] for sh in shard_plan.shards}
    for sh in sorted(shard_plan.shards, key=lambda s: (-s.bytes, s.index)):
        for _ in range(shard_replicas):
            options = [h for h in hosts if h not in placed[sh.index]]
            best = max(options, key=lambda h: (free[h], -hosts.index(h)))
            if free[best] < sh.bytes:
                raise _no_host(sh, best, free, budgets)
            free[best] -= sh.bytes
            placed[sh.index].append(best)
    return HostAssignment(shards=tuple(tuple(placed[sh.index]) for sh in shard_plan.shards),
                          budgets=dict(budgets), used={h: budgets[h] - free[h] for h in hosts})


def _no_host(shard, best: str, free: dict[str, int], budgets: dict[str, int]) -> PlannerError:
    """The error for ``shard`` fitting on no host: names the table at which ``best`` overflows."""
    room, table = free[best], shard.slices[0]
    for s in shard.slices:
        table = s
        room -= s.bytes
        if room < 0:
            break
    part = table.table if table.is_whole else f"{table.table}[{table.row_start}:{table.row_end})"
    return PlannerError(
        f"shard-{shard.index} ({shard.bytes:,} bytes) fits on no host: table {part!r} ({table.bytes:,} bytes) "
        f"overflows the host with the most room, {best!r} ({free[best]:,} of {budgets[best]:,} bytes left); "
        f"hosts: {', '.join(f'{h} {b:,}' for h, b in budgets.items())}. Serve on more hosts (or larger ones: "
        f"ray start --memory), or re-export with a plan for them (recserve plan --hosts N --host-memory BYTES)",
        PlannerErrorType.INSUFFICIENT_MEMORY,
        {"table": table.table, "shard": shard.index, "shard_bytes": shard.bytes, "free": dict(free)},
    )
