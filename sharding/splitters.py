"""Row-wise splitting: how many rows of a table each chosen shard takes.

A table that cannot live whole on one shard (bigger than the per-shard cap, no shard
has room for it, or, for the ``load`` strategy, hotter than one shard's fair share of
the cost) is cut into contiguous row ranges, one per shard. The split assumes ids are
drawn uniformly over the rows, so a slice carries ``rows_in_slice / rows`` of the
table's bytes *and* of its lookup cost. With skewed (zipf) ids the first rows are hotter
than this estimate says; the plan states the assumption rather than guessing the skew.

Example: a 10-row table over two empty shards, balancing bytes::

    >>> water_fill(loads=[0.0, 0.0], room=[8, 8], weight=1.0, rows=10)
    [5, 5]
    >>> water_fill(loads=[4.0, 0.0], room=[8, 8], weight=1.0, rows=10)
    [3, 7]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sharding.types import TableSlice, TableSpec, row_bytes


def water_fill(*, loads: Sequence[float], room: Sequence[int], weight: float, rows: int) -> list[int]:
    """Rows per shard so that the highest resulting load ``loads[i] + n[i] * weight`` is as
    low as possible, with ``n[i] <= room[i]`` and ``sum(n) == rows``.

    ``loads`` are the shards' current loads (bytes or cost), ``room`` how many more rows of
    this table each can hold, ``weight`` the load one row adds. Deterministic: ties go to
    the earlier shard. The caller guarantees ``sum(room) >= rows``.
    """
    if len(loads) != len(room) or not loads:
        raise ValueError("water_fill: loads and room must be non-empty and of equal length")
    if sum(room) < rows:
        raise ValueError(f"water_fill: room for {sum(room)} rows, {rows} requested")
    if weight <= 0:  # rows add no load: spread them evenly by count instead
        loads, weight = [0.0] * len(loads), 1.0

    def taken(level: float) -> list[int]:
        return [min(r, max(0, math.floor((level - l) / weight))) for l, r in zip(loads, room)]

    # Smallest water level that takes every row (bisection; the level is monotone).
    lo, hi = min(loads), max(loads) + (rows + 1) * weight
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(taken(mid)) >= rows:
            hi = mid
        else:
            lo = mid
    counts = taken(hi)
    # At the level where the count jumps, several shards may each take one row too many:
    # give them back from the most loaded shard first (later shard on ties).
    excess = sum(counts) - rows
    while excess > 0:
        i = max(
            (i for i, n in enumerate(counts) if n > 0),
            key=lambda i: (loads[i] + counts[i] * weight, i),
        )
        counts[i] -= 1
        excess -= 1
    return counts


def slices_of(table: TableSpec, rows_per_part: Sequence[int]) -> list[TableSlice]:
    """Cut ``table`` into contiguous slices of the given row counts (zeros are skipped).

    Bytes of a slice are exact (rows x row bytes); its cost is the table's cost scaled by
    its share of the rows (uniform access assumed).
    """
    if sum(rows_per_part) != table.rows or any(n < 0 for n in rows_per_part):
        raise ValueError(f"table {table.name!r}: row counts {list(rows_per_part)} do not sum to {table.rows}")
    per_row = row_bytes(table.dim, table.dtype)
    out: list[TableSlice] = []
    start = 0
    for n in rows_per_part:
        if n == 0:
            continue
        out.append(
            TableSlice(
                table=table.name,
                row_start=start,
                row_end=start + n,
                rows_total=table.rows,
                dim=table.dim,
                bytes=n * per_row,  # bytes
                cost=table.cost if n == table.rows else table.cost * n / table.rows,
            )
        )
        start += n
    return out


def whole(table: TableSpec) -> TableSlice:
    """The whole table as one slice."""
    (only,) = slices_of(table, [table.rows])
    return only
