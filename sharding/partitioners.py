"""Partitioners: one per strategy, each places every table (or row slice of one) on a shard.

All of them are greedy, deterministic list schedulers over the same shard model:

=========  =====================  ==========================  ============================
strategy   table order            shard chosen                row-wise split when
=========  =====================  ==========================  ============================
singular   model order            shard 0 (the only one)      never
table      bytes desc, name       fewest bytes, index         never
capacity   bytes desc, name       most free room, index       table > cap, or no shard has
                                                              room for it whole
load       cost desc, bytes desc, lowest cost, fewest bytes,  table > cap, no shard has
           name                   index                       room for it, or its cost is
                                                              above one shard's fair share
=========  =====================  ==========================  ============================

A split table is cut into as few contiguous row ranges as the reason allows, one per
shard, and the rows are shared out so that the chosen shards end as even as possible in
bytes (capacity) or cost (load) (:func:`sharding.splitters.water_fill`). Slices of one
table always land on distinct shards.

``capacity`` and ``load`` then refine the greedy result on their *other* figure
(:func:`sharding.placement.rebalance`): while moving a piece off the worst shard, or swapping
it for one or two pieces of another shard (or two of its pieces for one), lowers the worst
shard's cost (capacity) or bytes (load) without raising the highest bytes (capacity) or
cost (load) and without breaking the cap, the exchange is made. The figure the strategy
is named after never gets worse, and no shard is ever emptied.

Because an empty shard is always the preferred shard (most room, fewest bytes, zero
cost), a shard stays empty only when there are fewer tables or slices than shards.

The ``Partitioner`` interface is in :mod:`sharding.types`; the placement and rebalancing
machinery the strategies share in :mod:`sharding.placement`.
"""

from __future__ import annotations

import math

from sharding.placement import Balance, ShardBin, in_model_order, new_bins, place, rebalance
from sharding.types import Partitioner, PlannerError, PlannerErrorType


class _Refining(Partitioner):
    """A strategy whose greedy result is then refined on its other figure
    (:func:`~sharding.placement.rebalance`); ``refine=False`` keeps the greedy stage alone
    (for comparison)."""

    def __init__(self, *, refine: bool = True) -> None:
        self.refine_pass = refine

    def refine(self, bins: list[ShardBin], *, keep: Balance, improve: Balance) -> None:
        if self.refine_pass:
            rebalance(bins, keep=keep, improve=improve)


class SingularPartitioner(Partitioner):
    """Every table on one shard: the single-server baseline. ``num_shards`` must be 1."""

    name = "singular"

    def validate(self, *, num_shards: int, shard_memory: int | None) -> None:
        if num_shards != 1:
            raise PlannerError(
                f"num_shards: the singular strategy puts every table on one shard, so it "
                f"must be 1, got {num_shards}",
                PlannerErrorType.INVALID_INPUT,
                {"num_shards": num_shards},
            )

    def partition(self, tables, *, num_shards, shard_memory):
        bins = new_bins(1, shard_memory)
        for t in tables:
            place(t, bins, prefer=lambda b: (b.index,), balance="bytes", strategy=self.name)
        return in_model_order(tables, bins)


class TablePartitioner(Partitioner):
    """One table per shard; with more tables than shards, largest first onto the shard
    with the fewest bytes. Tables are never split; ``shard_memory`` is respected if given.
    With fewer tables than shards the last shards stay empty."""

    name = "table"

    def partition(self, tables, *, num_shards, shard_memory):
        bins = new_bins(num_shards, shard_memory)
        for t in sorted(tables, key=lambda t: (-t.bytes, t.name)):
            place(t, bins, prefer=lambda b: (b.bytes, b.index), balance="bytes", strategy=self.name)
        return in_model_order(tables, bins)


class CapacityPartitioner(_Refining):
    """Bin-packs bytes under the per-shard cap: largest first onto the shard with the most
    free room (worst-fit decreasing, which also evens out bytes). Tables bigger than the cap
    are split into ``ceil(bytes / cap)`` or more row ranges."""

    name = "capacity"

    def validate(self, *, num_shards: int, shard_memory: int | None) -> None:
        if shard_memory is None:
            raise PlannerError(
                "shard_memory: the capacity strategy packs bytes under a per-shard cap, so it is required",
                PlannerErrorType.INVALID_INPUT,
                {"shard_memory": None},
            )

    def partition(self, tables, *, num_shards, shard_memory):
        assert shard_memory is not None
        bins = new_bins(num_shards, shard_memory)
        for t in sorted(tables, key=lambda t: (-t.bytes, t.name)):
            place(
                t,
                bins,
                prefer=lambda b: (b.bytes, b.index),  # most free room first (equal caps)
                balance="bytes",
                min_slices=math.ceil(t.bytes / shard_memory),
                may_split=True,
                strategy=self.name,
            )
        self.refine(bins, keep="bytes", improve="cost")
        return in_model_order(tables, bins)


class LoadPartitioner(_Refining):
    """Balances estimated lookup cost (pooling factor x dim x bytes/element x request rate):
    longest-processing-time-first greedy, costliest table onto the shard with the lowest
    cost. A table whose cost exceeds one shard's fair share (total cost / num_shards) is
    split row-wise into ``ceil(cost / share)`` slices (at most ``num_shards``), so no single
    hot table sets the maximum; ``shard_memory`` is respected if given, splitting tables
    bigger than it."""

    name = "load"

    def partition(self, tables, *, num_shards, shard_memory):
        bins = new_bins(num_shards, shard_memory)
        share = sum(t.cost for t in tables) / num_shards  # fair cost per shard
        for t in sorted(tables, key=lambda t: (-t.cost, -t.bytes, t.name)):
            by_cost = math.ceil(t.cost / share - 1e-9) if share > 0 else 1
            by_bytes = math.ceil(t.bytes / shard_memory) if shard_memory else 1
            place(
                t,
                bins,
                prefer=lambda b: (b.cost, b.bytes, b.index),
                balance="cost",
                min_slices=max(1, min(by_cost, num_shards), by_bytes),
                may_split=True,
                strategy=self.name,
            )
        self.refine(bins, keep="cost", improve="bytes")
        return in_model_order(tables, bins)


PARTITIONERS: dict[str, type[Partitioner]] = {
    p.name: p for p in (SingularPartitioner, TablePartitioner, CapacityPartitioner, LoadPartitioner)
}
