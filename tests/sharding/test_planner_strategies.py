"""What each strategy does, and how the planner refuses what it cannot do."""

from __future__ import annotations

import math

import pytest
from tests.sharding.planner_helpers import assert_every_row_placed_exactly_once

from recserve.planning import table_specs
from recserve.workloads import load_workload
from sharding import PlannerError, PlannerErrorType, TableSpec, plan
from sharding.partitioners import CapacityPartitioner, LoadPartitioner


def spec(name: str, rows: int, dim: int = 4, pooling_factor: float = 1.0, dtype: str = "fp32") -> TableSpec:
    return TableSpec(name=name, rows=rows, dim=dim, pooling_factor=pooling_factor, dtype=dtype)


def test_singular_puts_every_table_on_one_shard_in_model_order():
    tables = [spec("b", 10), spec("a", 20), spec("c", 5)]
    p = plan(tables, strategy="singular", num_shards=1)
    assert p.num_shards == 1
    assert [s.table for s in p.shards[0].slices] == ["b", "a", "c"]
    assert all(s.is_whole for s in p.shards[0].slices)


def test_singular_with_more_than_one_shard_is_invalid_input():
    with pytest.raises(PlannerError, match="num_shards") as e:
        plan([spec("a", 10)], strategy="singular", num_shards=2)
    assert e.value.error_type is PlannerErrorType.INVALID_INPUT


def test_table_strategy_gives_each_table_its_own_shard_largest_first():
    tables = [spec("small", 10), spec("big", 1000), spec("mid", 100)]
    p = plan(tables, strategy="table", num_shards=3)
    assert [sh.tables for sh in p.shards] == [("big",), ("mid",), ("small",)]


def test_table_strategy_packs_extra_tables_onto_the_least_loaded_shard():
    tables = [spec("a", 100), spec("b", 90), spec("c", 60), spec("d", 50), spec("e", 10)]
    p = plan(tables, strategy="table", num_shards=2)
    # a(100)->0, b(90)->1, c(60)->1 (90<100), d(50)->0 (100<150), e(10)->0 (150=150, index)
    assert [set(sh.tables) for sh in p.shards] == [{"a", "d", "e"}, {"b", "c"}]
    assert all(s.is_whole for sh in p.shards for s in sh.slices)


def test_table_strategy_never_splits_and_says_which_table_does_not_fit():
    tables = [spec("a", 100), spec("huge", 1000)]
    with pytest.raises(PlannerError) as e:
        plan(tables, strategy="table", num_shards=2, shard_memory=5000)
    err = e.value
    assert err.error_type is PlannerErrorType.INSUFFICIENT_MEMORY
    assert "'huge'" in str(err) and "16,000 bytes" in str(err)
    assert err.details["table"] == "huge" and err.details["table_bytes"] == 16000


def test_capacity_requires_shard_memory():
    with pytest.raises(PlannerError, match="shard_memory") as e:
        plan([spec("a", 10)], strategy="capacity", num_shards=2)
    assert e.value.error_type is PlannerErrorType.INVALID_INPUT


def test_capacity_splits_tables_bigger_than_the_cap_into_contiguous_row_ranges():
    cap = 1000  # bytes; a row of dim 4 fp32 is 16 bytes
    tables = [spec("big", 150), spec("small", 20)]  # big: 2400 bytes -> at least 3 slices
    p = plan(tables, strategy="capacity", num_shards=4, shard_memory=cap)
    big = p.slices_of("big")
    assert len(big) >= math.ceil(2400 / cap)
    assert all(s.bytes <= cap for _, s in big)
    assert [s.row_start for _, s in big] == [0] + [s.row_end for _, s in big][:-1]
    assert len({shard for shard, _ in big}) == len(big)  # one slice per shard
    assert max(sh.bytes for sh in p.shards) <= cap
    assert_every_row_placed_exactly_once(p, tables)


def test_capacity_splits_a_table_when_free_room_is_fragmented():
    # Each shard keeps 60 bytes free after the 3 big tables; "last" (96 bytes) fits
    # on no shard whole, so it is split instead of failing.
    tables = [spec("x", 40), spec("y", 40), spec("last", 6)]
    p = plan(tables, strategy="capacity", num_shards=2, shard_memory=700)
    assert len(p.slices_of("last")) == 2
    assert max(sh.bytes for sh in p.shards) <= 700


def test_capacity_balances_bytes_across_shards():
    tables = table_specs(load_workload("criteo-kaggle"), "fp32")
    cap = 2 * 10**9
    p = plan(tables, strategy="capacity", num_shards=4, shard_memory=cap)
    assert p.balance()["bytes_max_over_mean"] < 1.25


def test_a_table_too_big_for_the_total_free_room_names_the_table_its_size_and_the_room():
    tables = [spec("a", 50), spec("b", 50), spec("too_big", 200)]  # 800 + 800 + 3200 bytes
    with pytest.raises(PlannerError) as e:
        plan(tables, strategy="capacity", num_shards=2, shard_memory=1500)
    msg = str(e.value)
    assert e.value.error_type is PlannerErrorType.INSUFFICIENT_MEMORY
    assert "'too_big'" in msg and "3,200 bytes" in msg and "200 rows" in msg
    assert "only 3,000 bytes left" in msg  # nothing placed yet: too_big goes first
    assert e.value.details["room_left"] == 3000


def test_shard_memory_smaller_than_one_row_is_insufficient_memory_naming_the_table():
    with pytest.raises(PlannerError, match="'wide'.*one row takes 512 bytes") as e:
        plan([spec("ok", 10), spec("wide", 10, dim=128)], strategy="load", num_shards=2, shard_memory=100)
    assert e.value.error_type is PlannerErrorType.INSUFFICIENT_MEMORY


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(strategy="round-robin", num_shards=2), "strategy"),
        (dict(strategy="table", num_shards=0), "num_shards"),
        (dict(strategy="table", num_shards=-3), "num_shards"),
        (dict(strategy="load", num_shards=2, shard_memory=0), "shard_memory"),
    ],
)
def test_bad_arguments_are_invalid_input_naming_the_field(kwargs, field):
    with pytest.raises(PlannerError, match=field) as e:
        plan([spec("a", 10)], **kwargs)
    assert e.value.error_type is PlannerErrorType.INVALID_INPUT


def test_bad_table_sets_are_invalid_input():
    with pytest.raises(PlannerError, match="nothing to plan"):
        plan([], strategy="table", num_shards=1)
    with pytest.raises(PlannerError, match="duplicate table name"):
        plan([spec("a", 10), spec("a", 20)], strategy="table", num_shards=1)
    with pytest.raises(PlannerError, match="one dtype"):
        plan([spec("a", 10), spec("b", 10, dtype="fp16")], strategy="table", num_shards=1)


def test_load_balances_cost_better_than_table_on_a_skewed_workload():
    tables = table_specs(load_workload("dlrmv2"), "fp16")  # pooling 1..100: skewed
    for n in (4, 8):
        by_table = plan(tables, strategy="table", num_shards=n).balance()
        by_load = plan(tables, strategy="load", num_shards=n).balance()
        assert by_load["cost_max_over_mean"] < by_table["cost_max_over_mean"]
        assert by_load["cost_max_over_mean"] < 1.1


def test_load_places_costliest_tables_first_onto_the_cheapest_shard():
    tables = [spec("a", 10, pooling_factor=5), spec("b", 10, pooling_factor=4),
              spec("c", 10, pooling_factor=3), spec("d", 10, pooling_factor=3)]
    p = plan(tables, strategy="load", num_shards=2)
    # costs 80, 64, 48, 48; share 120, so no split. a->0, b->1, c->1 (64<80), d->0 (80<112)
    assert [set(sh.tables) for sh in p.shards] == [{"a", "d"}, {"b", "c"}]
    assert p.balance()["cost_max_over_mean"] == pytest.approx(128 / 120)


def test_load_splits_a_table_hotter_than_one_shards_share_in_proportion_to_rows():
    tables = [spec("hot", 1000, pooling_factor=30), spec("cold", 1000, pooling_factor=1)]
    p = plan(tables, strategy="load", num_shards=4)
    hot = p.slices_of("hot")
    assert len(hot) == 4
    for _, s in hot:
        assert s.cost == pytest.approx(tables[0].cost * s.rows / 1000)
    assert p.balance()["cost_max_over_mean"] < 1.1


def test_load_respects_shard_memory_and_splits_tables_bigger_than_it():
    tables = table_specs(load_workload("dlrmv2"), "fp32")  # four 20.48 GB tables
    cap = 12 * 10**9
    p = plan(tables, strategy="load", num_shards=16, shard_memory=cap)
    assert max(sh.bytes for sh in p.shards) <= cap
    for name in ("t_cat_0", "t_cat_9", "t_cat_19"):
        assert len(p.slices_of(name)) >= 2
    assert_every_row_placed_exactly_once(p, tables)


def test_plans_print_a_readable_table():
    p = plan([spec("a", 10), spec("b", 300)], strategy="capacity", num_shards=2, shard_memory=4000)
    text = str(p)
    assert "strategy=capacity" in text and "b[0:" in text and "balance" in text


@pytest.mark.parametrize("num_shards", [2, 4, 8])
def test_rebalancing_evens_the_other_figure_without_raising_the_strategys_own(num_shards):
    for workload in ("criteo-kaggle", "dlrmv2"):
        tables = table_specs(load_workload(workload), "fp32")
        cap = 2 * sum(t.bytes for t in tables) // num_shards
        for strategy, own, other in (
            (LoadPartitioner, "cost", "bytes"),
            (CapacityPartitioner, "bytes", "cost"),
        ):
            refined = strategy().partition(tables, num_shards=num_shards, shard_memory=cap)
            greedy = strategy(refine=False).partition(tables, num_shards=num_shards, shard_memory=cap)

            def peak(per_shard, which):
                return max(sum(getattr(s, which) for s in sh) for sh in per_shard)

            assert peak(refined, own) <= peak(greedy, own) * (1 + 1e-9)
            assert peak(refined, other) <= peak(greedy, other)
            assert max(sum(s.bytes for s in sh) for sh in refined) <= cap
