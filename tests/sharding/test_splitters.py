"""Row-wise splitting: water filling and slice construction."""

from __future__ import annotations

import random

import pytest

from sharding import TableSpec
from sharding.splitters import slices_of, water_fill


def test_water_fill_splits_evenly_over_empty_shards():
    assert water_fill(loads=[0.0, 0.0, 0.0], room=[100, 100, 100], weight=2.0, rows=10) == [4, 3, 3]


def test_water_fill_tops_up_the_lighter_shard_first():
    assert water_fill(loads=[4.0, 0.0], room=[8, 8], weight=1.0, rows=10) == [3, 7]
    assert water_fill(loads=[100.0, 0.0], room=[50, 50], weight=1.0, rows=10) == [0, 10]


def test_water_fill_respects_room():
    assert water_fill(loads=[0.0, 0.0], room=[2, 100], weight=1.0, rows=10) == [2, 8]


def test_water_fill_with_zero_weight_spreads_rows_by_count():
    assert water_fill(loads=[5.0, 0.0], room=[10, 10], weight=0.0, rows=6) == [3, 3]


def test_water_fill_refuses_more_rows_than_room():
    with pytest.raises(ValueError, match="room for 4 rows"):
        water_fill(loads=[0.0, 0.0], room=[2, 2], weight=1.0, rows=5)


def test_water_fill_is_optimal_on_random_inputs():
    """The highest resulting load cannot be lowered by moving one row."""
    rng = random.Random(3)
    for _ in range(500):
        k = rng.randint(1, 8)
        loads = [rng.uniform(0, 100) for _ in range(k)]
        room = [rng.randint(0, 50) for _ in range(k)]
        if sum(room) == 0:
            continue
        rows = rng.randint(1, sum(room))
        w = rng.uniform(0.1, 10)
        n = water_fill(loads=loads, room=room, weight=w, rows=rows)
        assert sum(n) == rows and all(0 <= a <= r for a, r in zip(n, room))
        final = [l + a * w for l, a in zip(loads, n)]
        top = max(i for i in range(k) if n[i] > 0 and final[i] == max(final[j] for j in range(k) if n[j] > 0))
        for j in range(k):
            if j != top and n[j] < room[j]:
                assert final[j] + w >= final[top] - 1e-9 * max(1, final[top])


def test_slices_of_cuts_contiguous_ranges_and_shares_cost_by_rows():
    t = TableSpec(name="t", rows=10, dim=4, pooling_factor=5.0)
    parts = slices_of(t, [3, 0, 7])
    assert [(s.row_start, s.row_end) for s in parts] == [(0, 3), (3, 10)]
    assert [s.bytes for s in parts] == [3 * 16, 7 * 16]
    assert sum(s.cost for s in parts) == pytest.approx(t.cost)
    assert parts[1].cost == pytest.approx(t.cost * 0.7)
    with pytest.raises(ValueError, match="do not sum"):
        slices_of(t, [3, 3])
