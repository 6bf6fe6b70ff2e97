"""A workload's tables -> a sharding plan: the bridge between workloads (recserve) and the pure
planner (sharding), used by ``recserve plan`` (recserve/cli/plan.py), export and the benchmarks.

:func:`table_specs` turns a workload's tables into planner input; :func:`parse_bytes`
reads sizes such as ``512MiB`` or ``80GB``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from recserve.layout import dense_shapes, interaction_width
from recserve.workloads import WorkloadConfig
from sharding import GpuTopology, ShardPlan, TableSpec, plan, plan_for_gpus

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"1000"``, ``"512MiB"``, ``"2GiB"``, ``"1GB"``, ``"1.5GiB"`` -> bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024; case does not matter. Raises ValueError naming the text otherwise.
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (use bytes or a number with B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    try:
        value = Decimal(m.group(1)) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"not a size: {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r} = {value} bytes")
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def table_specs(
    workload: WorkloadConfig, dtype: str, *, request_rates: dict[str, float] | None = None
) -> list[TableSpec]:
    """Planner input for ``workload``'s tables stored in ``dtype``, in model order.

    A table read by several features gets ``pooling_factor x number of features`` lookups
    per request. ``request_rates`` (table name -> relative rate, default 1.0: every request
    carries every feature) scales a table's cost, e.g. for faded or optional features.
    """
    rates = dict(request_rates or {})
    unknown = set(rates) - {t.name for t in workload.tables}
    if unknown:
        raise ValueError(f"request_rates: unknown table(s) {sorted(unknown)}")
    return [
        TableSpec(
            name=t.name,
            rows=t.rows,
            dim=t.dim,
            pooling_factor=t.pooling_factor * len(t.features),
            request_rate=rates.get(t.name, 1.0),
            dtype=dtype,  # type: ignore[arg-type]
        )
        for t in workload.tables
    ]


def plan_workload(
    workload: WorkloadConfig,
    *,
    strategy: str,
    num_shards: int,
    shard_memory: int | None = None,
    dtype: str = "fp32",
) -> ShardPlan:
    """Plan ``workload``'s tables (what ``recserve plan`` and ``recserve export`` call)."""
    return plan(table_specs(workload, dtype), strategy=strategy, num_shards=num_shards, shard_memory=shard_memory)


# Examples in one batched tower call that its activation memory is sized for.
TOWER_BATCH = 65_536


def tower_bytes(workload: WorkloadConfig, *, batch: int = TOWER_BATCH, ring_slots: int = 0,
                ring_examples: int = 0, wire_bytes: int = 2) -> int:
    """Bytes one dense tower replica takes on its GPU: fp32 weights, plus activations of a
    ``batch``-example call (its [B, interaction width] input and its two widest layers, fp32),
    plus the ring the shards write pooled embeddings into over CUDA IPC (serving/engine/ipc.py):
    ``ring_slots`` x ``ring_examples`` x features x D x ``wire_bytes`` (0 slots: no ring)."""
    weights = sum(math.prod(shape) for shape in dense_shapes(workload).values())
    widths = [interaction_width(workload), *workload.bottom_mlp, *workload.top_mlp]
    widest = sorted(widths)[-2:]
    ring = ring_slots * ring_examples * len(workload.features) * workload.embedding_dim * wire_bytes
    return 4 * (weights + batch * (interaction_width(workload) + sum(widest))) + ring


def plan_workload_for_gpus(
    workload: WorkloadConfig,
    *,
    strategy: str,
    topology: GpuTopology,
    num_shards: int | None = None,
    dtype: str = "fp32",
) -> ShardPlan:
    """Plan ``workload``'s tables over the GPUs of ``topology`` (shard count chosen if None)."""
    return plan_for_gpus(table_specs(workload, dtype), strategy=strategy, topology=topology, num_shards=num_shards)
