"""Planning for the GPUs of one host: each shard's memory budget from the GPU's memory.

Pure Python (no Ray, torch or CUDA). Serving places the deployments with Ray's GPU
resources (serving/app/placement.py) using the same slot arithmetic as here, so the planner's
memory budget and Ray's placement agree on how many shard replicas one GPU can hold.

The model of a GPU (all sizes in bytes)::

    gpu_memory
      - reserve.fraction x gpu_memory    CUDA context, allocator slack, fragmentation
      - reserve.fixed                    CUDA graphs, batch buffers, kernel workspaces
      - towers x tower_bytes             dense towers sharing this GPU ("shared" only)
      = room for shard replicas, split evenly over ``shards_per_gpu`` of them

``shards_per_gpu = ceil(num_shards x shard_replicas / shard_gpus)`` where ``shard_gpus`` is
every GPU ("shared": the towers take a small share of one of them) or every GPU but the
towers' own ("own": each tower replica has a GPU to itself). It is the most shard replicas
Ray will put on one GPU (serving/app/placement.py gives each a 1/shards_per_gpu share), so the
budget holds wherever Ray puts them. Example: dlrmv2 with doubled 40M-row tables (207 GB
fp32) on 2 x 141 GB: usable 141 x 0.9 - 4 GiB = 122.6 GB per GPU, 2 shards, one per GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sharding.planners import plan_within_budget
from sharding.types import PlannerError, PlannerErrorType, ShardPlan, TableSpec

TowerGpu = Literal["shared", "own"]
TOWER_GPUS: tuple[str, ...] = ("shared", "own")

# Tried shard counts when the caller gives none: multiples of the step up to this many shards.
MAX_AUTO_SHARDS = 64


@dataclass(frozen=True, kw_only=True)
class GpuReserve:
    """GPU memory kept free of embedding tables: ``fraction`` of the GPU plus ``fixed`` bytes."""

    fraction: float = 0.10  # CUDA context, allocator caching and fragmentation
    fixed: int = 4 * 2**30  # bytes: CUDA graphs (one per batch bucket), pinned staging, kernel workspaces

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"reserve fraction: must be in [0, 1), got {self.fraction}")
        if self.fixed < 0:
            raise ValueError(f"reserve fixed: must be >= 0 bytes, got {self.fixed}")

    def bytes_of(self, gpu_memory: int) -> int:
        """Bytes reserved on a GPU of ``gpu_memory`` bytes."""
        return math.ceil(self.fraction * gpu_memory) + self.fixed


@dataclass(frozen=True, kw_only=True)
class GpuTopology:
    """The GPUs of one host and what runs on them besides the shards."""

    gpus: int  # GPUs of the host that serve this package
    gpu_memory: int  # bytes per GPU (e.g. 141 GB for an H200)
    shard_replicas: int = 1  # replicas per shard deployment; each holds a full copy of its shard
    tower: TowerGpu = "shared"  # the dense tower beside the shards, or on a GPU of its own
    tower_replicas: int = 1
    tower_bytes: int = 0  # bytes: one tower replica's weights and activations
    reserve: GpuReserve = GpuReserve()

    def __post_init__(self) -> None:
        def bad(message: str) -> PlannerError:
            return PlannerError(message, PlannerErrorType.INVALID_INPUT)

        for name in ("gpus", "gpu_memory", "shard_replicas", "tower_replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name}: must be an integer >= 1, got {value!r}")
        if self.tower not in TOWER_GPUS:
            raise bad(f"tower: must be one of {TOWER_GPUS}, got {self.tower!r}")
        if self.tower_bytes < 0:
            raise bad(f"tower_bytes: must be >= 0, got {self.tower_bytes}")
        if self.tower == "own" and self.gpus <= self.tower_replicas:
            raise bad(f"tower 'own': {self.tower_replicas} tower replica(s) on GPUs of their own leave no GPU "
                      f"for the shards of {self.gpus} GPU(s); use tower 'shared' or more GPUs")
        if self.usable_memory <= 0:
            raise bad(f"gpu_memory: {self.gpu_memory:,} bytes leave nothing for tables after the reserve "
                      f"({self.reserve.bytes_of(self.gpu_memory):,} bytes) and the tower(s)")

    @property
    def shard_gpus(self) -> int:
        """GPUs that hold shards."""
        return self.gpus - self.tower_replicas if self.tower == "own" else self.gpus

    @property
    def usable_memory(self) -> int:
        """Bytes per shard GPU left for shard replicas (worst case: every tower replica on it)."""
        towers = self.tower_replicas * self.tower_bytes if self.tower == "shared" else 0
        return self.gpu_memory - self.reserve.bytes_of(self.gpu_memory) - towers

    @property
    def shard_count_step(self) -> int:
        """Shard counts that spread evenly (the same number of replicas on every shard GPU)
        are the multiples of this."""
        return self.shard_gpus // math.gcd(self.shard_gpus, self.shard_replicas)

    def shards_per_gpu(self, num_shards: int) -> int:
        """The most shard replicas one GPU holds: ceil(shards x replicas / shard GPUs)."""
        return math.ceil(num_shards * self.shard_replicas / self.shard_gpus)

    def shard_memory(self, num_shards: int) -> int:
        """Per-shard memory cap (bytes) for a plan of ``num_shards`` shards on these GPUs."""
        return self.usable_memory // self.shards_per_gpu(num_shards)

    def describe(self, num_shards: int) -> str:
        return (
            f"{self.gpus} GPU(s) x {self.gpu_memory:,} bytes, reserve {self.reserve.fraction:.0%} + "
            f"{self.reserve.fixed:,} bytes, tower {self.tower} ({self.tower_replicas} x {self.tower_bytes:,} bytes); "
            f"{num_shards} shard(s) x {self.shard_replicas} replica(s) on {self.shard_gpus} GPU(s): "
            f"{self.shards_per_gpu(num_shards)} per GPU, {self.shard_memory(num_shards):,} bytes each"
        )


def plan_for_gpus(
    tables: Sequence[TableSpec],
    *,
    strategy: str,
    topology: GpuTopology,
    num_shards: int | None = None,
) -> ShardPlan:
    """Plan ``tables`` over ``topology``'s GPUs, each shard capped at its share of a GPU.

    ``num_shards`` must be a multiple of ``topology.shard_count_step`` (every shard GPU holds
    as many replicas as the next). None: the smallest such multiple (up to MAX_AUTO_SHARDS, and
    at least one shard per table for the ``table`` strategy) whose plan fits. Raises
    :class:`PlannerError` naming the table that fits nowhere, with the GPU budget in the message.
    """
    step = topology.shard_count_step
    if num_shards is not None:
        if not isinstance(num_shards, int) or num_shards < 1 or num_shards % step:
            raise PlannerError(
                f"num_shards: {num_shards!r} shard(s) x {topology.shard_replicas} replica(s) do not spread evenly "
                f"over {topology.shard_gpus} shard GPU(s); use a multiple of {step}",
                PlannerErrorType.INVALID_INPUT, {"num_shards": num_shards, "step": step},
            )
        counts = [num_shards]
    else:
        first = step * math.ceil(len(tables) / step) if strategy == "table" else step
        counts = list(range(first, max(first, MAX_AUTO_SHARDS) + 1, step))
    capacity = topology.shard_gpus * topology.usable_memory

    def over_budget(error: PlannerError, counts: Sequence[int], total: int) -> PlannerError:
        tried = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}..{counts[-1]} (step {step})"
        return PlannerError(
            f"{topology.gpus} GPU(s): cannot plan {tried} shard(s): {error.message} [GPU budget: "
            f"{topology.describe(counts[-1])}; the tables take {total:,} bytes x {topology.shard_replicas} "
            f"replica(s), the GPUs hold {capacity:,} for shard replicas]",
            PlannerErrorType.INSUFFICIENT_MEMORY,
            {**error.details, "gpus": topology.gpus, "shard_counts_tried": list(counts), "tables_bytes": total,
             "gpu_capacity": capacity},
        )

    return plan_within_budget(tables, strategy=strategy, counts=counts, shard_memory=topology.shard_memory,
                              replicas=topology.shard_replicas, capacity=capacity, over_budget=over_budget)
