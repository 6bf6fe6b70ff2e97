"""Data types of the sharding planner: table specs in, a plan out.

Pure Python: no torch, Ray, gRPC or CUDA. A plan is plain data that round-trips
through JSON; the model package stores it in its manifest and serving routes by it.

Layout of a plan with a row-wise split (table ``big`` has 10 rows, cap forces a split)::

    shard 0: small[0:4)  big[0:6)
    shard 1: big[6:10)

An id ``i`` of ``big`` goes to the shard whose slice has ``row_start <= i < row_end``
and is looked up there as row ``i - row_start``; the partial pooled vectors of all
slices of a table are summed (sum pooling), which gives the unsplit result.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Dtype = Literal["fp32", "fp16", "bf16", "int8", "int4"]
Strategy = Literal["singular", "table", "capacity", "load"]

DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4")
STRATEGIES: tuple[str, ...] = ("singular", "table", "capacity", "load")

# Row-wise quantized rows carry an fp32 scale and an fp32 bias each.
QUANT_ROW_OVERHEAD = 8  # bytes per row


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes one embedding row takes in storage ``dtype`` (quantized: + scale and bias)."""
    if dtype == "fp32":
        return 4 * dim
    if dtype in ("fp16", "bf16"):
        return 2 * dim
    if dtype == "int8":
        return dim + QUANT_ROW_OVERHEAD
    if dtype == "int4":
        return (dim + 1) // 2 + QUANT_ROW_OVERHEAD
    raise ValueError(f"dtype: must be one of {DTYPES}, got {dtype!r}")


def element_bytes(dtype: str) -> float:
    """Bytes per embedding element read by a lookup (quantization overhead excluded)."""
    return {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}[dtype]


@dataclass(frozen=True, kw_only=True)
class TableSpec:
    """What the planner needs to know about one table."""

    name: str
    rows: int
    dim: int
    pooling_factor: float = 1.0  # mean ids per bag
    request_rate: float = 1.0  # relative rate of requests that touch this table
    dtype: Dtype = "fp32"

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.name!r}: rows and dim must be positive")
        if self.pooling_factor < 0 or self.request_rate < 0:
            raise ValueError(f"table {self.name!r}: pooling_factor and request_rate must be >= 0")
        row_bytes(self.dim, self.dtype)  # validates dtype

    @property
    def bytes(self) -> int:  # bytes of the whole table in storage dtype
        return self.rows * row_bytes(self.dim, self.dtype)

    @property
    def cost(self) -> float:
        """Estimated lookup cost per request: pooling factor x dim x bytes/element x rate."""
        return self.pooling_factor * self.dim * element_bytes(self.dtype) * self.request_rate


@dataclass(frozen=True, kw_only=True)
class TableSlice:
    """A table, or a contiguous range of its rows, placed on one shard."""

    table: str
    row_start: int  # first row (inclusive)
    row_end: int  # last row (exclusive)
    rows_total: int  # rows of the whole table
    dim: int
    bytes: int  # storage bytes of this slice
    cost: float  # estimated lookup cost carried by this slice

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def is_whole(self) -> bool:
        return self.row_start == 0 and self.row_end == self.rows_total

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "row_start": self.row_start,
            "row_end": self.row_end,
            "rows_total": self.rows_total,
            "dim": self.dim,
            "bytes": self.bytes,
            "cost": self.cost,
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> TableSlice:
        return TableSlice(**raw)


@dataclass(frozen=True, kw_only=True)
class Shard:
    index: int
    slices: tuple[TableSlice, ...]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.slices)

    @property
    def cost(self) -> float:
        return sum(s.cost for s in self.slices)

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.table for s in self.slices))

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "slices": [s.to_json() for s in self.slices]}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Shard:
        return Shard(index=raw["index"], slices=tuple(TableSlice.from_json(s) for s in raw["slices"]))


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """Which shard holds which table (or row range of a table)."""

    strategy: Strategy
    dtype: Dtype
    shard_memory: int | None  # per-shard cap in bytes, if any
    shards: tuple[Shard, ...]

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def slices_of(self, table: str) -> tuple[tuple[int, TableSlice], ...]:
        """(shard index, slice) for every slice of ``table``, in row order."""
        found = [(sh.index, s) for sh in self.shards for s in sh.slices if s.table == table]
        return tuple(sorted(found, key=lambda p: p[1].row_start))

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.table for sh in self.shards for s in sh.slices))

    def balance(self) -> dict[str, float]:
        """max/mean of per-shard bytes and cost (1.0 is perfect balance)."""
        n = max(len(self.shards), 1)
        b = [sh.bytes for sh in self.shards]
        c = [sh.cost for sh in self.shards]
        mean_b, mean_c = sum(b) / n, sum(c) / n
        return {
            "max_bytes": float(max(b, default=0)),
            "mean_bytes": mean_b,
            "bytes_max_over_mean": (max(b) / mean_b) if mean_b else 1.0,
            "max_cost": float(max(c, default=0)),
            "mean_cost": mean_c,
            "cost_max_over_mean": (max(c) / mean_c) if mean_c else 1.0,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "dtype": self.dtype,
            "shard_memory": self.shard_memory,
            "shards": [sh.to_json() for sh in self.shards],
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> ShardPlan:
        return ShardPlan(
            strategy=raw["strategy"],
            dtype=raw["dtype"],
            shard_memory=raw.get("shard_memory"),
            shards=tuple(Shard.from_json(s) for s in raw["shards"]),
        )

    def __str__(self) -> str:
        lines = [
            f"plan: strategy={self.strategy} shards={self.num_shards} dtype={self.dtype}"
            + (f" shard_memory={self.shard_memory}" if self.shard_memory else "")
        ]
        lines.append(f"{'shard':>5}  {'bytes':>14}  {'cost':>12}  tables")
        for sh in self.shards:
            parts = [s.table if s.is_whole else f"{s.table}[{s.row_start}:{s.row_end})" for s in sh.slices]
            lines.append(f"{sh.index:>5}  {sh.bytes:>14,}  {sh.cost:>12.1f}  {' '.join(parts) or '-'}")
        bal = self.balance()
        lines.append(
            f"balance: bytes max/mean {bal['bytes_max_over_mean']:.3f}  "
            f"cost max/mean {bal['cost_max_over_mean']:.3f}"
        )
        return "\n".join(lines)


class PlannerErrorType(enum.Enum):
    INSUFFICIENT_MEMORY = "insufficient_memory"  # a table or slice fits on no shard
    INVALID_INPUT = "invalid_input"  # bad strategy, shard count, duplicate tables...


@dataclass
class PlannerError(Exception):
    """The planner cannot produce a plan; ``message`` says which table and why."""

    message: str
    error_type: PlannerErrorType = PlannerErrorType.INVALID_INPUT
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


class Partitioner(abc.ABC):
    """The partitioning stage: places tables on ``num_shards`` shards of ``shard_memory`` bytes
    each (None = no cap). The strategies are in :mod:`sharding.partitioners`."""

    name: ClassVar[str]

    def validate(self, *, num_shards: int, shard_memory: int | None) -> None:
        """Reject settings this strategy cannot honour (the planner checks the rest)."""

    @abc.abstractmethod
    def partition(
        self, tables: Sequence[TableSpec], *, num_shards: int, shard_memory: int | None
    ) -> list[list[TableSlice]]:
        """Slices per shard, shard 0 first."""
