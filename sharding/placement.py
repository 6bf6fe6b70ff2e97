"""Placement machinery shared by the partitioners (sharding/partitioners.py): shards as bins
being filled, placing a table on the preferred shard (or splitting it row-wise over the fewest
shards that have room for it), and the rebalancing pass that exchanges pieces between shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

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

# Rebalancing (see rebalance): an exchange must lower the worst shard's figure
# by at least MIN_GAIN of it; pairs of pieces are tried only on shards holding at most
# PAIR_LIMIT pieces; the search stops after MAX_EXCHANGES_TRIED candidates (a count, not a
# time, so plans stay deterministic). Together they keep planning hundreds of tables to
# about a second.
MIN_GAIN = 1e-3
PAIR_LIMIT = 12
MAX_EXCHANGES_TRIED = 300_000


def place(
    table: TableSpec,
    bins: list[ShardBin],
    *,
    prefer: Callable[[ShardBin], tuple],
    balance: Balance,
    min_slices: int = 1,
    may_split: bool = False,
    strategy: str,
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
            raise no_room(table, bins, split=False, strategy=strategy)
    candidates = [b for b in candidates if b.free_rows(table) > 0]
    chosen: list[ShardBin] = []
    room = 0
    for b in candidates:
        if len(chosen) >= min_slices and room >= table.rows:
            break
        chosen.append(b)
        room += b.free_rows(table)
    if room < table.rows:
        raise no_room(table, bins, split=True, strategy=strategy)
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

def rebalance(bins: list[ShardBin], *, keep: Balance, improve: Balance) -> None:
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
                    if _would_meet(give, dst, take) or _would_meet(take, src, give):
                        continue  # two slices of one table would share a shard
                    key = (after, dst.index, [(x.table, x.row_start) for x in give + take])
                    if best is None or key < best[0]:
                        best = (key, dst, give, take)
        if best is None:
            return
        _, dst, give, take = best
        for x in give:
            _move(src, dst, x)
        for x in take:
            _move(dst, src, x)

def _would_meet(incoming: tuple[TableSlice, ...], b: ShardBin, leaving: tuple[TableSlice, ...]) -> bool:
    staying = {x.table for x in b.slices if x not in leaving}
    return any(x.table in staying for x in incoming)

def _move(src: ShardBin, dst: ShardBin, piece: TableSlice) -> None:
    src.slices.remove(piece)
    src.bytes -= piece.bytes
    src.cost -= piece.cost
    dst.add(piece)

def no_room(table: TableSpec, bins: list[ShardBin], *, split: bool, strategy: str) -> PlannerError:
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
        f"{strategy}: cannot place table {table.name!r} ({table.bytes:,} bytes = "
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
            "strategy": strategy,
        },
    )


def new_bins(num_shards: int, shard_memory: int | None) -> list[ShardBin]:
    return [ShardBin(index=i, capacity=shard_memory) for i in range(num_shards)]

def in_model_order(tables: Sequence[TableSpec], bins: list[ShardBin]) -> list[list[TableSlice]]:
    """Each shard's slices in the order their tables appear in the model."""
    position = {t.name: i for i, t in enumerate(tables)}
    return [sorted(b.slices, key=lambda s: (position[s.table], s.row_start)) for b in bins]
