"""The monolith (whole model, one process, plain grpc.aio) over real gRPC on 127.0.0.1:
the broad parity matrix, every bad input, deadlines, health."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from recserve.batch import Bags, Batch
from recserve.synth import TrafficGenerator
from serving.api.client import RankingClient
from serving.engine.admission import AdmissionConfig
from serving.standalone.monolith import MonolithThread

TOL = 1e-5
LAYOUTS = ["singular-1", "table-2", "table-3", "capacity-1", "capacity-2", "capacity-3", "load-1", "load-2", "load-3"]


@pytest.fixture(scope="module")
def servers(tiny_packages, helpers):
    running = {}

    def get(layout: str, **kwargs) -> RankingClient:
        key = (layout, tuple(sorted(kwargs.items())))
        if key not in running:
            srv = MonolithThread(tiny_packages(layout), max_batch_size=helpers.max_batch, **kwargs).start()
            running[key] = (srv, RankingClient(f"127.0.0.1:{srv.port}"))
        return running[key][1]

    yield get
    for srv, client in running.values():
        client.close()
        srv.stop()


def _batches(tiny, with_weights):
    gen = TrafficGenerator(tiny, seed=21, empty_bag_fraction=0.3)
    yield "batch size 1", gen.batch(1)
    yield "ragged with empty bags", gen.batch(37)
    yield "per-id weights", with_weights(gen.batch(17))
    B = 3
    yield "all bags empty", Batch(gen.batch(B).dense, {f: Bags.empty(B) for f in tiny.features})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_monolith_scores_equal_torchrec_for_every_strategy_and_shard_count(layout, servers, reference, tiny, helpers):
    client = servers(layout)
    for case, batch in _batches(tiny, helpers.with_weights):
        got = client.predict(batch.dense, helpers.as_sparse(batch), unit_ids=batch.unit_ids, timeout=30)
        np.testing.assert_allclose(got, reference(batch), rtol=0, atol=TOL, err_msg=f"{layout}: {case}")


def test_every_bad_input_gets_its_code_and_the_server_stays_up(servers, tiny, reference, helpers):
    client = servers("capacity-3")
    for case, request, code, text in helpers.bad_requests(tiny):
        with pytest.raises(grpc.RpcError) as err:
            client.predict_raw(request, timeout=30)
        assert err.value.code() == grpc.StatusCode[code], case
        assert text in err.value.details(), (case, err.value.details())
    batch = TrafficGenerator(tiny, seed=1).batch(4)
    got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)
    np.testing.assert_allclose(got, reference(batch), atol=TOL)


def test_a_missed_deadline_is_deadline_exceeded_and_the_server_stays_up(tiny_packages, tiny, reference, helpers):
    as_sparse = helpers.as_sparse

    def slow(batch):  # a feature filter that takes 300 ms: the work outlasts the deadline
        time.sleep(0.3)
        return batch

    batch = TrafficGenerator(tiny, seed=2).batch(8)
    with MonolithThread(tiny_packages("table-2"), feature_filter=slow) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:
        with pytest.raises(grpc.RpcError) as err:
            client.predict(batch.dense, as_sparse(batch), timeout=0.1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        got = client.predict(batch.dense, as_sparse(batch), timeout=30)
        np.testing.assert_allclose(got, reference(batch), atol=TOL)


def test_overload_is_resource_exhausted(tiny_packages, tiny, helpers):
    from concurrent.futures import ThreadPoolExecutor

    def slow(batch):
        time.sleep(0.5)
        return batch

    batch = TrafficGenerator(tiny, seed=4).batch(2)
    with MonolithThread(tiny_packages("singular-1"), feature_filter=slow, max_in_flight=1) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:

        def call(_):
            try:
                client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with ThreadPoolExecutor(4) as pool:
            codes = sorted(pool.map(call, range(4)))
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes


def test_the_adaptive_door_works_its_slots_lets_a_quarter_wait_and_refuses_the_rest_naming_why(
        tiny_packages, tiny, helpers):
    """serving/engine/door.py in the monolith: 2 slots, 1 may wait (a quarter, at least one); of 6
    slow calls at once, 3 are answered and 3 refused at once with the door's reason."""
    from concurrent.futures import ThreadPoolExecutor

    def slow(batch):
        time.sleep(0.4)
        return batch

    batch = TrafficGenerator(tiny, seed=4).batch(2)
    with MonolithThread(tiny_packages("singular-1"), feature_filter=slow, max_in_flight=2, max_queued=4,
                        adaptive_door=True, workers=2) as srv, RankingClient(f"127.0.0.1:{srv.port}") as client:

        def call(_):
            try:
                client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)
                return "OK", ""
            except grpc.RpcError as e:
                return e.code().name, e.details()

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(call, range(6)))
    codes = sorted(code for code, _ in answers)
    assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 3, answers
    assert all("this server works on 2 requests" in why for code, why in answers if code != "OK"), answers


def test_a_burst_is_shed_at_once_and_every_admitted_request_is_scored_correctly(tiny_packages, tiny, reference,
                                                                                helpers):
    from concurrent.futures import ThreadPoolExecutor

    # 250 ms of work per request: a burst of 24 is 3 s of work for 2 workers, more than its
    # 2.5 s deadline. The sleep dwarfs the scoring, so a loaded machine cannot stretch the
    # admitted requests past their deadline: the estimate assumes one request at a time, the
    # two workers answer the ~10 it admits in about half the time.
    def slow(batch):
        time.sleep(0.25)
        return batch

    batch = TrafficGenerator(tiny, seed=6).batch(8)
    expected = reference(batch)
    with MonolithThread(tiny_packages("table-2"), feature_filter=slow, workers=2) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:
        learn = AdmissionConfig()
        for _ in range(learn.warmup + learn.min_samples):  # past the warm-up: the estimate has its samples
            client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)

        def call(_):
            try:
                got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=2.5)
                np.testing.assert_allclose(got, expected, atol=TOL)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(call, range(24)))
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes  # shed at the door, never timed out in a queue


def test_a_long_malformed_timeout_header_is_quoted_briefly(servers, tiny, helpers):
    from serving.api.wire import TIMEOUT_METADATA
    from serving.api.codec import encode_request

    batch = TrafficGenerator(tiny, seed=7).batch(2)
    with pytest.raises(grpc.RpcError) as err:
        servers("load-2").stub.Predict(encode_request(batch.dense, helpers.as_sparse(batch)), timeout=30,
                                       metadata=[(TIMEOUT_METADATA, "x" * 4_000)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert TIMEOUT_METADATA in err.value.details() and len(err.value.details()) < 300


def test_health_and_model_info_answer(servers, tiny):
    client = servers("load-2")
    assert client.health_check() == "SERVING"
    assert client.health_check("") == "SERVING"
    info = client.model_info()
    assert info.model == "tiny" and info.num_shards == 2 and info.dense_features == tiny.dense_features
    assert list(info.features) == list(tiny.features)
    assert {t.name: t.rows for t in info.tables} == {t.name: t.rows for t in tiny.tables}
    with pytest.raises(grpc.RpcError) as err:
        client.model_info("no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_feature_filter_runs_before_the_split_and_sees_the_request_id(tiny_packages, tiny, reference, helpers):
    from serving.engine.routing import REQUEST_ID

    seen = []

    def drop_history(batch):  # fade recent_items out entirely: scored as empty bags
        seen.append(REQUEST_ID.get())
        sparse = {f: (Bags.empty(batch.batch_size) if f == "recent_items" else b) for f, b in batch.sparse.items()}
        return Batch(batch.dense, sparse, batch.unit_ids)

    batch = TrafficGenerator(tiny, seed=5).batch(6)
    with MonolithThread(tiny_packages("table-3"), feature_filter=drop_history) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:
        got = client.predict(batch.dense, helpers.as_sparse(batch), request_id="req-42", timeout=30)
    assert seen == ["req-42"]
    np.testing.assert_allclose(got, reference(drop_history(batch)), atol=TOL)


def test_a_mixed_burst_is_coalesced_and_each_request_gets_the_unbatched_scores_or_its_own_error(
        tiny_packages, tiny, helpers):
    """16 concurrent requests of mixed sizes, bad and short-deadline ones among them: the good
    ones are scored in fewer batches than requests (one lookup per shard and one tower call
    per batch: the "lookup" stage counts them), each gets the scores it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import REGISTRY

    from serving.api.wire import TIMEOUT_METADATA
    from serving.api.codec import encode_request

    def lookups() -> float:
        return REGISTRY.get_sample_value("recserve_stage_ms_count", {"stage": "lookup"}) or 0.0

    def paced(batch):  # 10 ms per request on the worker: the burst queues behind the first batch
        time.sleep(0.01)
        return batch

    gen = TrafficGenerator(tiny, seed=12, empty_bag_fraction=0.2)
    good = [gen.batch(b) for b in (1, 9, 3, 17, 2, 12, 5, 30, 4, 7, 1, 21)]
    good[2] = helpers.with_weights(good[2])
    bad = helpers.bad_requests(tiny)[:3]
    with MonolithThread(tiny_packages("table-2"), feature_filter=paced) as srv, \
            RankingClient(f"127.0.0.1:{srv.port}") as client:
        alone = [client.predict(b.dense, helpers.as_sparse(b), timeout=30) for b in good]
        before = lookups()

        def send(job):
            kind, x = job
            try:
                if kind == "good":
                    return client.predict(x[0].dense, helpers.as_sparse(x[0]), timeout=30)
                if kind == "short":  # 5 ms: cannot be scored behind 150 ms of queued work
                    return client.stub.Predict(encode_request(x.dense, helpers.as_sparse(x)), timeout=30,
                                               metadata=[(TIMEOUT_METADATA, "5")])
                return client.predict_raw(x[1], timeout=30)
            except grpc.RpcError as e:
                return e

        jobs = [("good", (b, alone[i])) for i, b in enumerate(good)]
        for i, case in enumerate(bad):
            jobs.insert(3 * i + 1, ("bad", case))
        jobs.append(("short", good[0]))
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(send, jobs))
        batches = lookups() - before
    for (kind, x), result in zip(jobs, results):
        if kind == "good":
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result, x[1], rtol=0, atol=1e-6)
        elif kind == "short":
            assert isinstance(result, grpc.RpcError)
            assert result.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        else:
            case, _, code, text = x
            assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode[code], case
            assert text in result.details(), (case, result.details())
    assert 1 <= batches < len(good), f"{len(good)} requests scored in {batches:.0f} batches"
