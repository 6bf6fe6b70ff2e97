"""Shared helpers for the planner tests: independent checks of a plan's invariants."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sharding import ShardPlan, TableSpec, row_bytes


def assert_every_row_placed_exactly_once(p: ShardPlan, tables: Sequence[TableSpec]) -> None:
    """Each table's slices tile [0, rows) with no gap and no overlap; nothing else is placed."""
    by_name = {t.name: t for t in tables}
    seen: dict[str, list[tuple[int, int]]] = {t.name: [] for t in tables}
    for sh in p.shards:
        names = [s.table for s in sh.slices]
        assert len(names) == len(set(names)), f"shard {sh.index} holds two slices of one table: {names}"
        for s in sh.slices:
            assert s.table in by_name, f"unknown table {s.table}"
            seen[s.table].append((s.row_start, s.row_end))
    for name, ranges in seen.items():
        ranges.sort()
        assert ranges, f"table {name} placed nowhere"
        assert ranges[0][0] == 0 and ranges[-1][1] == by_name[name].rows, (name, ranges)
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start, f"table {name}: gap or overlap at {end}/{start}"
        assert all(a < b for a, b in ranges), f"table {name}: empty slice in {ranges}"


def assert_bytes_and_cost_add_up(p: ShardPlan, tables: Sequence[TableSpec]) -> None:
    total_bytes = sum(t.bytes for t in tables)
    total_cost = sum(t.cost for t in tables)
    assert sum(sh.bytes for sh in p.shards) == total_bytes
    assert abs(sum(sh.cost for sh in p.shards) - total_cost) <= 1e-6 * max(1.0, total_cost)
    for sh in p.shards:
        for s in sh.slices:
            t = next(t for t in tables if t.name == s.table)
            assert s.bytes == s.rows * row_bytes(t.dim, t.dtype)


def assignment(p: ShardPlan) -> list[set[tuple[str, int, int]]]:
    """What each shard holds, ignoring the order of slices within a shard."""
    return [{(s.table, s.row_start, s.row_end) for s in sh.slices} for sh in p.shards]


def random_tables(rng: random.Random, *, dtype: str = "fp32", max_tables: int = 12) -> list[TableSpec]:
    """A random table set with a long-tailed size and pooling distribution."""
    n = rng.randint(1, max_tables)
    dim = rng.choice([4, 8, 16, 24, 64, 128])
    return [
        TableSpec(
            name=f"t{i:02d}",
            rows=int(10 ** rng.uniform(0, 5)) + 1,
            dim=dim if rng.random() < 0.7 else rng.choice([4, 8, 12, 32]),
            pooling_factor=round(10 ** rng.uniform(-1, 2), 2),
            request_rate=rng.choice([1.0, 1.0, 0.5, 0.1]),
            dtype=dtype,
        )
        for i in range(n)
    ]
