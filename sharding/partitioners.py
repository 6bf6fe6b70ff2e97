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
(:meth:`Partitioner._rebalance`): while moving a piece off the worst shard, or swapping
it for one or two pieces of another shard (or two of its pieces for one), lowers the worst
shard's cost (capacity) or bytes (load) without raising the highest bytes (capacity) or
cost (load) and without breaking the cap, the exchange is made. The figure the strategy
is named after never gets worse, and no shard is ever emptied.

Because an empty shard is always the preferred shard (most room, fewest bytes, zero
cost), a shard stays empty only when there are fewer tables or slices than shards.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from sharding.splitters import slices_of, water_fill, whole
from sharding.types import PlannerError, PlannerErrorType, TableSlice, TableSpec, row_bytes


@dataclass
class ShardBin:
    """A shard while it is being filled."""

    index: int
    capacity: int | None  # bytes; None = unbounded
    slices: list[TableSlice] = field(default_factory=list)
    bytes: int = 0  # bytes placed so far
    cost: float = 0.0  # estimated cost placed so far

    @property
    def free(self) -> int | None:  # bytes left, None = unbounded
        return None if self.capacity is None else self.capacity - self.bytes

    def free_rows(self, table: TableSpec) -> int:
        """How many more rows of ``table`` fit here."""
        if self.capacity is None:
            return table.rows
        return min(table.rows, max(0, self.free) // row_bytes(table.dim, table.dtype))

    def holds(self, table: TableSpec) -> bool:
        return any(s.table == table.name for s in self.slices)

    def add(self, piece: TableSlice) -> None:
        self.slices.append(piece)
        self.bytes += piece.bytes
        self.cost += piece.cost


Balance = Literal["bytes", "cost"]

# Rebalancing (see Partitioner._rebalance): an exchange must lower the worst shard's figure
# by at least MIN_GAIN of it; pairs of pieces are tried only on shards holding at most
# PAIR_LIMIT pieces; the search stops after MAX_EXCHANGES_TRIED candidates (a count, not a
# time, so plans stay deterministic). Together they keep planning hundreds of tables to
# about a second.
MIN_GAIN = 1e-3
PAIR_LIMIT = 12
MAX_EXCHANGES_TRIED = 300_000


class Partitioner(abc.ABC):
    """Places tables on ``num_shards`` shards of ``shard_memory`` bytes each (None = no cap)."""

    name: ClassVar[str]

    def validate(self, *, num_shards: int, shard_memory: int | None) -> None:
        """Reject settings this strategy cannot honour (the planner checks the rest)."""

    @abc.abstractmethod
    def partition(
        self, tables: Sequence[TableSpec], *, num_shards: int, shard_memory: int | None
    ) -> list[list[TableSlice]]:
        """Slices per shard, shard 0 first."""

    # -- shared machinery -----------------------------------------------------------

    def _place(
        self,
        table: TableSpec,
        bins: list[ShardBin],
        *,
        prefer: Callable[[ShardBin], tuple],
        balance: Balance,
        min_slices: int = 1,
        may_split: bool = False,
    ) -> None:
        """Put ``table`` on the most preferred shard with room for it whole, or, where
        ``min_slices > 1`` or no shard has room, split it over the fewest shards that do."""
        candidates = sorted((b for b in bins if not b.holds(table)), key=prefer)
        if min_slices <= 1:
            for b in candidates:
                if b.free_rows(table) == table.rows:
                    b.add(whole(table))
                    return
            if not may_split:
                raise self._no_room(table, bins, split=False)
        candidates = [b for b in candidates if b.free_rows(table) > 0]
        chosen: list[ShardBin] = []
        room = 0
        for b in candidates:
            if len(chosen) >= min_slices and room >= table.rows:
                break
            chosen.append(b)
            room += b.free_rows(table)
        if room < table.rows:
            raise self._no_room(table, bins, split=True)
        chosen.sort(key=lambda b: b.index)  # rows ascend with the shard index
        per_row = row_bytes(table.dim, table.dtype) if balance == "bytes" else table.cost / table.rows
        counts = water_fill(
            loads=[float(b.bytes) if balance == "bytes" else b.cost for b in chosen],
            room=[b.free_rows(table) for b in chosen],
            weight=per_row,
            rows=table.rows,
        )
        pieces = iter(slices_of(table, counts))
        for b, n in zip(chosen, counts):
            if n:
                b.add(next(pieces))

    def _rebalance(self, bins: list[ShardBin], *, keep: Balance, improve: Balance) -> None:
        """Lower the highest ``improve`` figure (bytes or cost) by exchanging pieces between
        the worst shard and another: one piece moved, or swapped for one or two pieces, or
        two pieces swapped for one. Never raises the highest ``keep`` figure, overfills a
        shard or puts two slices of a table on one shard. Deterministic, and it stops: each
        exchange lowers the worst shard's figure by at least ``MIN_GAIN`` and lifts no other
        shard to it, and the search gives up after ``MAX_EXCHANGES_TRIED`` candidates."""

        def fig(x: ShardBin, which: Balance) -> float:
            return float(x.bytes) if which == "bytes" else x.cost

        def groups(b: ShardBin, most: int) -> list[tuple[tuple[TableSlice, ...], float, float]]:
            """(pieces, their `improve` sum, their `keep` sum) for groups of up to `most` pieces."""
            if len(b.slices) > PAIR_LIMIT:  # many small pieces: single pieces are fine-grained enough
                most = min(most, 1)
            out = []
            for k in range(most + 1):
                for g in itertools.combinations(b.slices, k):
                    by, co = sum(x.bytes for x in g), sum(x.cost for x in g)
                    out.append((g, by, co) if improve == "bytes" else (g, co, by))
            return out

        limit = max(fig(b, keep) for b in bins) * (1 + 1e-12)
        budget = MAX_EXCHANGES_TRIED
        while budget > 0:
            src = max(bins, key=lambda b: (fig(b, improve), -b.index))
            worst, src_keep = fig(src, improve), fig(src, keep)
            gives = groups(src, 2)[1:]  # non-empty
            best: tuple | None = None
            for dst in bins:
                if dst is src:
                    continue
                dst_fig, dst_keep = fig(dst, improve), fig(dst, keep)
                takes = groups(dst, 2)
                for give, gi, gk in gives:
                    for take, ti, tk in takes:
                        if len(give) + len(take) > 3:
                            continue
                        budget -= 1
                        d_improve, d_keep = gi - ti, gk - tk  # flowing src -> dst
                        after = max(worst - d_improve, dst_fig + d_improve)
                        if d_improve <= 0 or after > worst * (1 - MIN_GAIN):
                            continue
                        if best is not None and after > best[0][0]:
                            continue
                        if max(src_keep - d_keep, dst_keep + d_keep) > limit:
                            continue
                        db = sum(x.bytes for x in give) - sum(x.bytes for x in take)
                        if dst.capacity is not None and dst.bytes + db > dst.capacity:
                            continue
                        if src.capacity is not None and src.bytes - db > src.capacity:
                            continue
                        if self._would_meet(give, dst, take) or self._would_meet(take, src, give):
                            continue  # two slices of one table would share a shard
                        key = (after, dst.index, [(x.table, x.row_start) for x in give + take])
                        if best is None or key < best[0]:
                            best = (key, dst, give, take)
            if best is None:
                return
            _, dst, give, take = best
            for x in give:
                self._move(src, dst, x)
            for x in take:
                self._move(dst, src, x)

    @staticmethod
    def _would_meet(incoming: tuple[TableSlice, ...], b: ShardBin, leaving: tuple[TableSlice, ...]) -> bool:
        staying = {x.table for x in b.slices if x not in leaving}
        return any(x.table in staying for x in incoming)

    @staticmethod
    def _move(src: ShardBin, dst: ShardBin, piece: TableSlice) -> None:
        src.slices.remove(piece)
        src.bytes -= piece.bytes
        src.cost -= piece.cost
        dst.add(piece)

    def _no_room(self, table: TableSpec, bins: list[ShardBin], *, split: bool) -> PlannerError:
        free = [b.free or 0 for b in bins]
        per_row = row_bytes(table.dim, table.dtype)
        usable = sum((f // per_row) * per_row for f in free)  # bytes, whole rows only
        placed = sum(b.bytes for b in bins)
        why = (
            f"the shards have only {sum(free):,} bytes left"
            + (f" ({usable:,} in whole rows)" if usable != sum(free) else "")
            if split
            else f"it is never split and no shard has room for all of it (most free on one "
            f"shard: {max(free):,} bytes; {sum(free):,} left in total)"
        )
        return PlannerError(
            f"{self.name}: cannot place table {table.name!r} ({table.bytes:,} bytes = "
            f"{table.rows:,} rows x {per_row} B): {why}; {placed:,} bytes of {len(bins)} "
            f"shard(s) x {bins[0].capacity or 0:,} are already used. Use more shards, a larger "
            f"shard_memory or a smaller dtype"
            + (", or the capacity/load strategy, which split tables row-wise." if not split else "."),
            PlannerErrorType.INSUFFICIENT_MEMORY,
            {
                "table": table.name,
                "table_bytes": table.bytes,
                "room_left": sum(free),
                "free_per_shard": free,
                "strategy": self.name,
            },
        )

    @staticmethod
    def _bins(num_shards: int, shard_memory: int | None) -> list[ShardBin]:
        return [ShardBin(index=i, capacity=shard_memory) for i in range(num_shards)]

    @staticmethod
    def _in_model_order(tables: Sequence[TableSpec], bins: list[ShardBin]) -> list[list[TableSlice]]:
        """Each shard's slices in the order their tables appear in the model."""
        position = {t.name: i for i, t in enumerate(tables)}
        return [sorted(b.slices, key=lambda s: (position[s.table], s.row_start)) for b in bins]


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
        bins = self._bins(1, shard_memory)
        for t in tables:
            self._place(t, bins, prefer=lambda b: (b.index,), balance="bytes")
        return self._in_model_order(tables, bins)


class TablePartitioner(Partitioner):
    """One table per shard; with more tables than shards, largest first onto the shard
    with the fewest bytes. Tables are never split; ``shard_memory`` is respected if given.
    With fewer tables than shards the last shards stay empty."""

    name = "table"

    def partition(self, tables, *, num_shards, shard_memory):
        bins = self._bins(num_shards, shard_memory)
        for t in sorted(tables, key=lambda t: (-t.bytes, t.name)):
            self._place(t, bins, prefer=lambda b: (b.bytes, b.index), balance="bytes")
        return self._in_model_order(tables, bins)


class CapacityPartitioner(Partitioner):
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
        bins = self._bins(num_shards, shard_memory)
        for t in sorted(tables, key=lambda t: (-t.bytes, t.name)):
            self._place(
                t,
                bins,
                prefer=lambda b: (b.bytes, b.index),  # most free room first (equal caps)
                balance="bytes",
                min_slices=math.ceil(t.bytes / shard_memory),
                may_split=True,
            )
        self._rebalance(bins, keep="bytes", improve="cost")
        return self._in_model_order(tables, bins)


class LoadPartitioner(Partitioner):
    """Balances estimated lookup cost (pooling factor x dim x bytes/element x request rate):
    longest-processing-time-first greedy, costliest table onto the shard with the lowest
    cost. A table whose cost exceeds one shard's fair share (total cost / num_shards) is
    split row-wise into ``ceil(cost / share)`` slices (at most ``num_shards``), so no single
    hot table sets the maximum; ``shard_memory`` is respected if given, splitting tables
    bigger than it."""

    name = "load"

    def partition(self, tables, *, num_shards, shard_memory):
        bins = self._bins(num_shards, shard_memory)
        share = sum(t.cost for t in tables) / num_shards  # fair cost per shard
        for t in sorted(tables, key=lambda t: (-t.cost, -t.bytes, t.name)):
            by_cost = math.ceil(t.cost / share - 1e-9) if share > 0 else 1
            by_bytes = math.ceil(t.bytes / shard_memory) if shard_memory else 1
            self._place(
                t,
                bins,
                prefer=lambda b: (b.cost, b.bytes, b.index),
                balance="cost",
                min_slices=max(1, min(by_cost, num_shards), by_bytes),
                may_split=True,
            )
        self._rebalance(bins, keep="cost", improve="bytes")
        return self._in_model_order(tables, bins)


PARTITIONERS: dict[str, type[Partitioner]] = {
    p.name: p for p in (SingularPartitioner, TablePartitioner, CapacityPartitioner, LoadPartitioner)
}
