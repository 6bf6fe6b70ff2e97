"""Invariants every plan keeps: each row placed exactly once, caps respected, determinism,
JSON round trip; on the bundled workloads and on seeded random table sets."""

from __future__ import annotations

import json
import math
import random

import pytest
from tests.sharding.planner_helpers import (
    assert_bytes_and_cost_add_up,
    assert_every_row_placed_exactly_once,
    assignment,
    random_tables,
)

from recserve.planning import table_specs
from recserve.workloads import load_workload
from sharding import PlannerError, PlannerErrorType, ShardPlan, check_plan, plan, row_bytes

WORKLOADS = ("tiny", "criteo-kaggle", "dlrmv2")


def bundled(name: str, dtype: str = "fp32"):
    return table_specs(load_workload(name), dtype)


def roomy_cap(tables, num_shards: int) -> int:
    """A cap with 25% headroom over an even spread of the bytes, plus one row (rows are not cut)."""
    total = sum(t.bytes for t in tables)
    return math.ceil(1.25 * total / num_shards) + max(row_bytes(t.dim, t.dtype) for t in tables)


CASES = [
    (w, s, n, dtype)
    for w in WORKLOADS
    for s in ("table", "capacity", "load")
    for n in (1, 2, 4, 8)
    for dtype in ("fp32", "int8")
] + [(w, "singular", 1, dtype) for w in WORKLOADS for dtype in ("fp32", "int4")]


@pytest.mark.parametrize(("workload", "strategy", "num_shards", "dtype"), CASES)
def test_bundled_workloads_place_every_row_exactly_once(workload, strategy, num_shards, dtype):
    tables = bundled(workload, dtype)
    cap = roomy_cap(tables, num_shards) if strategy == "capacity" else None
    p = plan(tables, strategy=strategy, num_shards=num_shards, shard_memory=cap)
    assert p.num_shards == num_shards and p.dtype == dtype and p.strategy == strategy
    assert_every_row_placed_exactly_once(p, tables)
    assert_bytes_and_cost_add_up(p, tables)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("num_shards", [2, 3, 4, 8])
@pytest.mark.parametrize("slack", [1.0, 1.02, 1.5])
def test_capacity_plan_never_exceeds_shard_memory(workload, num_shards, slack):
    tables = bundled(workload)
    # slack 1.0: the cap is the even spread plus one row per shard, the tightest cap
    # under which the planner promises success (rows cannot be cut).
    worst_row = max(row_bytes(t.dim, t.dtype) for t in tables)
    cap = math.ceil(slack * sum(t.bytes for t in tables) / num_shards) + worst_row
    for strategy in ("capacity", "load"):
        p = plan(tables, strategy=strategy, num_shards=num_shards, shard_memory=cap)
        assert max(sh.bytes for sh in p.shards) <= cap, strategy
        assert_every_row_placed_exactly_once(p, tables)


def test_same_inputs_give_the_same_plan():
    for workload in WORKLOADS:
        tables = bundled(workload)
        for strategy in ("table", "capacity", "load"):
            cap = roomy_cap(tables, 4) if strategy != "table" else None
            first = plan(tables, strategy=strategy, num_shards=4, shard_memory=cap)
            again = plan(list(tables), strategy=strategy, num_shards=4, shard_memory=cap)
            assert first == again
            assert first.to_json() == again.to_json()


def test_table_order_does_not_change_the_assignment():
    rng = random.Random(7)
    for workload in WORKLOADS:
        tables = bundled(workload)
        shuffled = tables[:]
        rng.shuffle(shuffled)
        for strategy in ("table", "capacity", "load"):
            cap = roomy_cap(tables, 8) if strategy != "table" else None
            a = plan(tables, strategy=strategy, num_shards=8, shard_memory=cap)
            b = plan(shuffled, strategy=strategy, num_shards=8, shard_memory=cap)
            assert assignment(a) == assignment(b), (workload, strategy)


def test_slices_within_a_shard_follow_model_order():
    tables = bundled("criteo-kaggle")
    order = {t.name: i for i, t in enumerate(tables)}
    p = plan(tables, strategy="load", num_shards=4)
    for sh in p.shards:
        positions = [order[s.table] for s in sh.slices]
        assert positions == sorted(positions)


@pytest.mark.parametrize("strategy", ["singular", "table", "capacity", "load"])
def test_plan_round_trips_through_json(strategy):
    tables = bundled("dlrmv2", "fp16")
    n = 1 if strategy == "singular" else 8
    cap = 16 * 10**9 if strategy in ("capacity", "load") else None  # forces row-wise splits
    p = plan(tables, strategy=strategy, num_shards=n, shard_memory=cap)
    text = json.dumps(p.to_json())
    back = ShardPlan.from_json(json.loads(text))
    assert back == p
    assert str(back) == str(p)
    check_plan(back, tables)


def test_empty_shards_only_when_there_are_fewer_pieces_than_shards():
    tables = bundled("tiny")  # 4 tables
    p = plan(tables, strategy="table", num_shards=6)
    assert [len(sh.slices) for sh in p.shards] == [1, 1, 1, 1, 0, 0]
    rng = random.Random(11)
    for _ in range(150):
        tables = random_tables(rng)
        n = rng.randint(1, 10)
        for strategy in ("table", "capacity", "load"):
            cap = roomy_cap(tables, n) if strategy == "capacity" else None
            p = plan(tables, strategy=strategy, num_shards=n, shard_memory=cap)
            if any(not sh.slices for sh in p.shards):
                assert all(len(sh.slices) <= 1 for sh in p.shards), (strategy, str(p))


def test_random_tables_plan_soundly_or_fail_only_when_room_is_short():
    """Property check over seeded random inputs: capacity and load always succeed when the
    total bytes fit with one row of slack per shard, and every plan keeps the invariants."""
    rng = random.Random(2024)
    for case in range(300):
        dtype = rng.choice(["fp32", "fp16", "int8", "int4"])
        tables = random_tables(rng, dtype=dtype)
        n = rng.randint(1, 9)
        total = sum(t.bytes for t in tables)
        worst_row = max(row_bytes(t.dim, t.dtype) for t in tables)
        cap = max(worst_row, int(total / n * rng.uniform(0.7, 2.0)))
        fits = total + n * worst_row <= n * cap
        for strategy in ("table", "capacity", "load"):
            try:
                p = plan(tables, strategy=strategy, num_shards=n, shard_memory=cap)
            except PlannerError as e:
                assert e.error_type is PlannerErrorType.INSUFFICIENT_MEMORY, (case, strategy, e)
                assert strategy == "table" or not fits, (case, strategy, str(e))
                assert e.details["table"] in str(e)
                continue
            assert max(sh.bytes for sh in p.shards) <= cap
            assert_every_row_placed_exactly_once(p, tables)
            assert_bytes_and_cost_add_up(p, tables)
            assert plan(tables, strategy=strategy, num_shards=n, shard_memory=cap) == p
