import numpy as np

from loadtest.trace import cap_rows_to_served, fanout, make_trace
from recserve.v1 import ranker_pb2
from sharding.types import Shard, ShardPlan, TableSlice


def _plan(shards: list[list[tuple[str, int, int, int]]]) -> ShardPlan:
    """shards: per shard, (table, row_start, row_end, rows_total) slices (dim 8)."""
    return ShardPlan(
        strategy="table",
        dtype="fp32",
        shard_memory=None,
        shards=tuple(
            Shard(
                index=i,
                slices=tuple(
                    TableSlice(table=t, row_start=a, row_end=b, rows_total=n, dim=8, bytes=(b - a) * 32, cost=1.0)
                    for t, a, b, n in sl
                ),
            )
            for i, sl in enumerate(shards)
        ),
    )


def test_same_seed_gives_the_same_request_bytes(tiny):
    a, b = make_trace(tiny, 20, seed=3), make_trace(tiny, 20, seed=3)
    assert a.payloads == b.payloads
    assert make_trace(tiny, 20, seed=4).payloads != a.payloads


def test_encoded_requests_decode_to_the_generated_batches(tiny):
    trace = make_trace(tiny, 5, seed=1)
    for batch, payload in zip(trace.batches, trace.payloads):
        req = ranker_pb2.PredictRequest.FromString(payload)
        assert req.batch_size == batch.batch_size
        np.testing.assert_array_equal(np.array(req.dense, np.float32).reshape(batch.dense.shape), batch.dense)
        assert set(req.sparse) == set(tiny.features)
        for name, bags in batch.sparse.items():
            np.testing.assert_array_equal(req.sparse[name].values, bags.values)
            np.testing.assert_array_equal(req.sparse[name].lengths, bags.lengths)
            assert sum(req.sparse[name].lengths) == len(req.sparse[name].values)


def test_batch_sizes_stay_in_the_workloads_range(tiny):
    lo, hi = tiny.samples_per_request
    sizes = make_trace(tiny, 200, seed=0).batch_sizes
    assert sizes.min() >= lo and sizes.max() <= hi


def test_one_shard_holding_every_table_is_called_once_per_request(tiny):
    trace = make_trace(tiny, 30, seed=0)
    plan = _plan([[(t.name, 0, t.rows, t.rows) for t in tiny.tables]])
    f = fanout(trace, plan)
    assert (f.shard_calls == 1).all()
    assert (f.internal_bytes > 0).all()


def test_a_shard_whose_rows_get_no_ids_is_not_called(tiny):
    trace = make_trace(tiny, 30, seed=0)
    tables = {t.name: t for t in tiny.tables}
    user = tables["t_user"]
    # shard 0: the other tables; shard 1: all of t_user
    plan = _plan(
        [
            [(t.name, 0, t.rows, t.rows) for t in tiny.tables if t.name != "t_user"],
            [("t_user", 0, user.rows, user.rows)],
        ]
    )
    assert (fanout(trace, plan).shard_calls == 2).all()
    item = tables["t_item"]
    split = _plan(
        [
            [(t.name, 0, t.rows, t.rows) for t in tiny.tables if t.name != "t_item"],
            [("t_item", 0, item.rows - 1, item.rows)],
            [("t_item", item.rows - 1, item.rows, item.rows)],  # one row: almost never hit
        ]
    )
    calls = fanout(trace, split).shard_calls
    hit_last_row = np.array([(b.sparse["item_id"].values == item.rows - 1).any() for b in trace.batches])
    np.testing.assert_array_equal(calls, 2 + hit_last_row)


def test_rows_are_capped_at_what_the_server_holds(tiny):
    info = ranker_pb2.ModelInfoResponse(tables=[ranker_pb2.TableInfo(name="t_item", rows=100)])
    capped = cap_rows_to_served(tiny, info)
    assert {t.name: t.rows for t in capped.tables}["t_item"] == 100
    trace = make_trace(capped, 20, seed=0)
    assert all(b.sparse["item_id"].values.max(initial=0) < 100 for b in trace.batches)
