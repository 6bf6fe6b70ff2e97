"""Sharding planner: which shard holds which embedding table (or row range of one).

Pure Python over table specs; imports no torch, Ray, gRPC or CUDA. Entry point::

    plan(tables, strategy="load", num_shards=4, shard_memory=80 * 10**9) -> ShardPlan

Types, the JSON format and the ``Partitioner`` interface are in :mod:`sharding.types`; the
strategies in :mod:`sharding.partitioners`, the placement and rebalancing they share in
:mod:`sharding.placement`; row-wise splitting in :mod:`sharding.splitters`; per-GPU memory
budgets (``plan_for_gpus``) in :mod:`sharding.gpus`.
"""

from sharding.checks import check_plan
from sharding.gpus import TOWER_GPUS, GpuReserve, GpuTopology, plan_for_gpus
from sharding.partitioners import PARTITIONERS
from sharding.planners import plan
from sharding.stats import plan_report
from sharding.types import (
    DTYPES,
    STRATEGIES,
    Partitioner,
    PlannerError,
    PlannerErrorType,
    Shard,
    ShardPlan,
    TableSlice,
    TableSpec,
    element_bytes,
    row_bytes,
)

__all__ = [
    "DTYPES",
    "GpuReserve",
    "GpuTopology",
    "PARTITIONERS",
    "STRATEGIES",
    "TOWER_GPUS",
    "Partitioner",
    "PlannerError",
    "PlannerErrorType",
    "Shard",
    "ShardPlan",
    "TableSlice",
    "TableSpec",
    "check_plan",
    "element_bytes",
    "plan",
    "plan_for_gpus",
    "plan_report",
    "row_bytes",
]
