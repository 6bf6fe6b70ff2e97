"""Checks that a plan is sound for a set of tables.

The planner runs :func:`check_plan` on every plan it makes; export and serving can run it
on a plan read from a manifest, before trusting it to route ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sharding.types import PlannerError, PlannerErrorType, ShardPlan, TableSpec, row_bytes


def check_plan(plan: ShardPlan, tables: Sequence[TableSpec]) -> None:
    """Raise :class:`PlannerError` (INVALID_INPUT) naming the first problem found:

    - shards are numbered 0..N-1 in order, and N >= 1;
    - every table is covered exactly once: its slices, in row order, tile ``[0, rows)``
      with no gap and no overlap, and no slice names an unknown table;
    - each slice's dim, rows_total and bytes match its table and the plan's dtype, and its
      cost is the table's cost times its share of the rows;
    - no shard holds more than ``plan.shard_memory`` bytes.
    """

    def fail(message: str, **details: object) -> PlannerError:
        return PlannerError(f"invalid plan: {message}", PlannerErrorType.INVALID_INPUT, dict(details))

    if not plan.shards:
        raise fail("shards: a plan needs at least one shard")
    for i, sh in enumerate(plan.shards):
        if sh.index != i:
            raise fail(f"shards[{i}].index: expected {i}, got {sh.index}", shard=i)
    by_name = {t.name: t for t in tables}
    for t in tables:
        if t.dtype != plan.dtype:
            raise fail(f"table {t.name!r}: dtype {t.dtype} differs from the plan's {plan.dtype}", table=t.name)
    for sh in plan.shards:
        for s in sh.slices:
            t = by_name.get(s.table)
            if t is None:
                raise fail(f"shard {sh.index}: slice of unknown table {s.table!r}", table=s.table)
            if s.dim != t.dim or s.rows_total != t.rows:
                raise fail(
                    f"shard {sh.index}: slice of {t.name!r} says dim={s.dim} rows_total={s.rows_total}, "
                    f"table has dim={t.dim} rows={t.rows}",
                    table=t.name,
                )
            if s.bytes != s.rows * row_bytes(t.dim, plan.dtype):
                raise fail(f"shard {sh.index}: slice {s.table}[{s.row_start}:{s.row_end}) bytes={s.bytes} "
                           f"!= rows x row bytes", table=t.name)
            if not math.isclose(s.cost, t.cost * s.rows / t.rows, rel_tol=1e-9, abs_tol=1e-12):
                raise fail(f"shard {sh.index}: slice {s.table}[{s.row_start}:{s.row_end}) cost={s.cost} "
                           f"!= table cost x row share", table=t.name)
        if plan.shard_memory is not None and sh.bytes > plan.shard_memory:
            raise fail(
                f"shard {sh.index}: holds {sh.bytes:,} bytes, more than shard_memory {plan.shard_memory:,}",
                shard=sh.index,
            )
    for t in tables:
        slices = plan.slices_of(t.name)
        if not slices:
            raise fail(f"table {t.name!r} is on no shard", table=t.name)
        expect = 0
        for shard, s in slices:
            if s.row_start != expect or s.row_end <= s.row_start:
                raise fail(
                    f"table {t.name!r}: slice [{s.row_start}:{s.row_end}) on shard {shard} "
                    f"{'overlaps' if s.row_start < expect else 'leaves a gap'} at row {expect}",
                    table=t.name,
                )
            expect = s.row_end
        if expect != t.rows:
            raise fail(f"table {t.name!r}: rows {expect}..{t.rows} are on no shard", table=t.name)
