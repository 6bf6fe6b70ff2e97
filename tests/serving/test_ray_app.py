"""The sharded Ray Serve app over real gRPC on 127.0.0.1 (one Ray instance per session):
every strategy at least once, both transports, every bad input, a deadline, a shard down."""

from __future__ import annotations

import shutil
import socket
import time

import grpc
import numpy as np
import pytest

from recserve.batch import Bags, Batch
from recserve.synth import TrafficGenerator
from serving.app.dataplane import list_endpoints

TOL = 1e-5  # float32 on the wire
FP16_TOL = 5e-4  # float16 pooled embeddings on the wire (the default): each pooled value rounded to
# half precision (relative 2^-11) moved the scores by at most 4.2e-5 here; 10x that is the bound


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def _batches(tiny, with_weights):
    gen = TrafficGenerator(tiny, seed=31, empty_bag_fraction=0.3)
    yield "batch size 1", gen.batch(1)
    yield "ragged with empty bags", gen.batch(45)
    yield "per-id weights", with_weights(gen.batch(13))
    yield "all bags empty", Batch(gen.batch(2).dense, {f: Bags.empty(2) for f in tiny.features})


@pytest.fixture(scope="module")
def main_app(deploy, tiny_packages, helpers):
    """capacity, 3 shards, row-wise split tables, default transport: the app most tests share."""
    from ray import serve

    client = deploy(tiny_packages("capacity-3"), "main", max_batch_size=helpers.max_batch)
    yield client
    serve.delete("main")


@pytest.mark.parametrize(
    "layout,transport,fanout,wire",
    [("singular-1", "reference", "router", "float32"), ("table-2", "direct", "router", "float32"),
     ("load-2", "direct", "tower", "float16"), ("capacity-3", "grpc", "tower", "float16")],
)
def test_served_scores_equal_torchrec_for_every_strategy(layout, transport, fanout, wire, deploy, tiny_packages,
                                                         reference, tiny, helpers):
    from ray import serve

    name = f"{layout}-{transport}-{fanout}-{wire}"
    client = deploy(tiny_packages(layout), name, transport=transport, fanout=fanout, wire_dtype=wire)
    tol = TOL if wire == "float32" else FP16_TOL
    try:
        for case, batch in _batches(tiny, helpers.with_weights):
            got = client.predict(batch.dense, helpers.as_sparse(batch), unit_ids=batch.unit_ids, timeout=60)
            want = reference(batch)
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"{name}: {case}")
            print(f"{name} {case}: max |served - torchrec| = {np.abs(got - want).max():.2e}")
        sent = serve.get_deployment_handle("Router", app_name=name).data_plane.remote().result()
        assert (sent["direct"] > 0, sent["serve"] > 0) == (transport == "direct", transport != "direct"), sent
    finally:
        serve.delete(name)


def test_main_app_scores_equal_torchrec(main_app, reference, tiny, helpers):
    for case, batch in _batches(tiny, helpers.with_weights):
        got = main_app.predict(batch.dense, helpers.as_sparse(batch), timeout=60)
        np.testing.assert_allclose(got, reference(batch), rtol=0, atol=FP16_TOL, err_msg=case)


def test_concurrent_requests_are_batched_and_each_gets_its_own_scores(main_app, reference, tiny, helpers):
    from concurrent.futures import ThreadPoolExecutor

    gen = TrafficGenerator(tiny, seed=32, empty_bag_fraction=0.2)
    batches = [gen.batch(b) for b in (1, 7, 3, 16, 2, 9, 5, 11)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: main_app.predict(b.dense, helpers.as_sparse(b), timeout=60), batches))
    for batch, got in zip(batches, results):
        np.testing.assert_allclose(got, reference(batch), rtol=0, atol=FP16_TOL)


def test_the_default_transport_sends_every_batch_over_the_data_plane(main_app, tiny, helpers):
    """transport "direct" (the default): shards and tower answer on their own sockets; Serve's
    handles are only the fallback, and a healthy stack never needs it."""
    from ray import serve

    router = serve.get_deployment_handle("Router", app_name="main")
    before = router.data_plane.remote().result()
    gen = TrafficGenerator(tiny, seed=35)
    for b in (1, 6, 40):
        batch = gen.batch(b)
        assert np.isfinite(main_app.predict(batch.dense, helpers.as_sparse(batch), timeout=60)).all()
    after = router.data_plane.remote().result()
    assert after["direct"] - before["direct"] == 3
    assert after["serve"] == before["serve"] == 0


def _coalesced(app: str) -> dict[str, int]:
    from ray import serve

    return serve.get_deployment_handle("Router", app_name=app).coalesced.remote().result()


def test_a_mixed_burst_is_coalesced_and_each_request_gets_the_unbatched_scores_or_its_own_error(
        main_app, tiny, helpers):
    """Concurrent requests of mixed sizes, bad ones among them: the router merges the good ones
    (one split, one call per shard, one tower call), each gets the scores it gets alone, each
    bad one its own code."""
    from concurrent.futures import ThreadPoolExecutor

    gen = TrafficGenerator(tiny, seed=34, empty_bag_fraction=0.2)
    good = [gen.batch(b) for b in (1, 9, 3, 17, 2, 12, 5, 30, 4, 7, 1, 21)]
    good[2] = helpers.with_weights(good[2])
    bad = helpers.bad_requests(tiny)[:6]
    before = _coalesced("main")
    alone = [main_app.predict(b.dense, helpers.as_sparse(b), timeout=60) for b in good]  # one at a time
    after_alone = _coalesced("main")
    assert after_alone["items"] - before["items"] == after_alone["batches"] - before["batches"] == len(good)

    def send(job):
        kind, x = job
        try:
            if kind == "good":
                return main_app.predict(x[0].dense, helpers.as_sparse(x[0]), timeout=60)
            return main_app.predict_raw(x[1], timeout=60)
        except grpc.RpcError as e:
            return e

    jobs = [("good", (b, alone[i])) for i, b in enumerate(good)]
    for i, case in enumerate(bad):
        jobs.insert(2 * i + 1, ("bad", case))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    got = iter(results)
    for (kind, x), result in zip(jobs, got):
        if kind == "good":
            assert not isinstance(result, Exception), result
            np.testing.assert_allclose(result, x[1], rtol=0, atol=1e-6)
        else:
            case, _, code, text = x
            assert isinstance(result, grpc.RpcError), case
            assert result.code() == grpc.StatusCode[code] and text in result.details(), (case, result.details())
    burst = _coalesced("main")
    items, batches = burst["items"] - after_alone["items"], burst["batches"] - after_alone["batches"]
    assert items == len(good) and batches < items, f"{items} requests in {batches} batches: none were merged"


def test_every_bad_input_gets_its_code_over_serve(main_app, tiny, reference, helpers):
    for case, request, code, text in helpers.bad_requests(tiny):
        with pytest.raises(grpc.RpcError) as err:
            main_app.predict_raw(request, timeout=60)
        assert err.value.code() == grpc.StatusCode[code], (case, err.value.details())
        assert text in err.value.details(), (case, err.value.details())
    batch = TrafficGenerator(tiny, seed=1).batch(4)
    got = main_app.predict(batch.dense, helpers.as_sparse(batch), timeout=60)
    np.testing.assert_allclose(got, reference(batch), atol=FP16_TOL)


def test_the_callers_deadline_holds_end_to_end(deploy, tiny_packages, tiny, reference, helpers):
    from ray import serve

    from serving.api.wire import TIMEOUT_METADATA
    from serving.api.codec import encode_request

    # shards that wait wait_s for their batch to fill (it never does: 8 examples of 512), so no
    # answer can come sooner on any machine, and every budget below is certain to run out first
    wait_s = 3.0
    client = deploy(tiny_packages("table-2"), "slow", shard_batching={"max_batch_size": 512, "batch_wait_timeout_s": wait_s,
                                                                     "fixed_wait": True})
    try:
        batch = TrafficGenerator(tiny, seed=33).batch(8)
        request = encode_request(batch.dense, helpers.as_sparse(batch))
        # the header's budget: the router gives up, cancels the shard calls and answers
        # DEADLINE_EXCEEDED itself (the gRPC deadline is far away)
        metadata = [("application", "slow"), (TIMEOUT_METADATA, "200")]
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Predict(request, metadata=metadata, timeout=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline of 200 ms" in err.value.details(), err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # and a plain gRPC deadline ends the call too
            client.predict(batch.dense, helpers.as_sparse(batch), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        metadata = [("application", "slow"), (TIMEOUT_METADATA, "soon")]  # a malformed budget, named
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Predict(request, metadata=metadata, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and TIMEOUT_METADATA in err.value.details()
        got = client.predict(batch.dense, helpers.as_sparse(batch), timeout=60)  # served after the wait
        np.testing.assert_allclose(got, reference(batch), atol=FP16_TOL)
        # a request that runs out of time fails alone: the requests coalesced behind it are served
        from concurrent.futures import ThreadPoolExecutor

        short = [("application", "slow"), (TIMEOUT_METADATA, "1000")]
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.stub.Predict, request, metadata=short, timeout=60)
            time.sleep(0.2)  # in flight at the shards (their fixed 3 s wait) when the others come
            rest = [pool.submit(client.predict, batch.dense, helpers.as_sparse(batch), timeout=60) for _ in range(3)]
            with pytest.raises(grpc.RpcError) as err:
                first.result()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
            for r in rest:
                np.testing.assert_allclose(r.result(), reference(batch), atol=FP16_TOL)
    finally:
        serve.delete("slow", _blocking=False)


def test_health_and_model_info_over_serve(main_app, tiny):
    assert main_app.health_check() == "SERVING"
    info = main_app.model_info()
    assert info.model == "tiny" and info.num_shards == 3 and info.strategy == "capacity"
    assert any(len(t.shards) > 1 for t in info.tables), "capacity-3 splits a table over shards"


def test_a_shard_that_is_down_gives_unavailable_and_the_rest_keeps_serving(deploy, tiny_packages, tmp_path,
                                                                             reference, tiny, helpers):
    import ray
    from ray import serve

    package = shutil.copytree(tiny_packages("table-2"), tmp_path / "table-2")
    client = deploy(package, "down", shard_down_after_s=0.5, default_timeout_s=60)
    try:
        batch = TrafficGenerator(tiny, seed=34).batch(6)
        np.testing.assert_allclose(client.predict(batch.dense, helpers.as_sparse(batch), timeout=60),
                                   reference(batch), atol=FP16_TOL)
        from recserve.package import ModelPackage

        plan = ModelPackage.open(package).manifest.plan
        down = plan.shards[1]
        # shard 1 goes down for good: its file no longer verifies, so no replacement can start
        with open(package / "shards" / f"shard-{down.index}.safetensors", "ab") as f:
            f.write(b"corrupt")
        def replicas():
            return [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if f"down#shard-{down.index}#" in a["name"]]

        ports = list_endpoints("down").get(f"shard-{down.index}", [])
        assert ports, "the shard serves the direct data plane"
        for a in replicas():
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
        # ray.kill returns before the actor is gone, and the GCS forgets its name before its process
        # ends: until then the process still answers on its data-plane port
        deadline = time.monotonic() + 30
        while (replicas() or any(_listening(host, port) for _, host, port, _ in ports)) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            client.predict(batch.dense, helpers.as_sparse(batch), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert f"shard-{down.index}" in err.value.details()
        # a request that needs no table of the dead shard is still served, correctly
        down_features = {f for t in tiny.tables if t.name in {s.table for s in down.slices} for f in t.features}
        sparse = {f: (Bags.empty(6) if f in down_features else b) for f, b in batch.sparse.items()}
        partial = Batch(batch.dense, sparse)
        got = client.predict(partial.dense, helpers.as_sparse(partial), timeout=30)
        np.testing.assert_allclose(got, reference(partial), atol=FP16_TOL)
    finally:
        serve.delete("down", _blocking=False)
