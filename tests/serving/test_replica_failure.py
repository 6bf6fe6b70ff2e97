"""A shard replica SIGKILLed under load: with 2 replicas per shard no request fails (the
router retries a call that lost its replica on another one, within the deadline), and every
score stays correct."""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import numpy as np

from loadtest.cpu import processes_titled
from recserve.synth import TrafficGenerator

FP16_TOL = 5e-4  # float16 pooled embeddings on the wire (the default)


def replica_pids(app: str, deployment: str) -> list[int]:
    """Processes of the replicas of ``deployment`` in ``app`` (Ray titles them ServeReplica:app:deployment)
    of this process's Ray only: another session's Ray on the machine may run this same test."""
    return [p.pid for p in processes_titled([f"ServeReplica:{app}:{deployment}"], within=os.getpid())]


def test_cancelling_a_call_that_lost_its_upstream_replica_keeps_the_error_being_handled(serve_instance):
    """The cleanup path of a call whose input came from a replica that died: Serve 2.60's
    ``DeploymentResponse.cancel()`` raises that call's own error, which, raised from the router's
    cleanup, replaced the retry it was handling (the CI failure of the test below).
    ``cancel`` swallows it; the error maps to UNAVAILABLE, the code a retry is decided on."""
    import pytest
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from serving.api.errors import ShardUnavailable
    from serving.app.deployments import _as_serving_error, cancel

    @serve.deployment
    class Dies:
        def __call__(self) -> int:
            os._exit(1)  # the replica's process dies under the call, as a SIGKILL would

    @serve.deployment
    class Adds:
        def __call__(self, x: int) -> int:
            return x + 1

    dies = serve.run(Dies.bind(), name="upstream-dies", route_prefix=None)
    adds = serve.run(Adds.bind(), name="upstream-adds", route_prefix=None)
    try:
        doomed = dies.remote()
        first, second = adds.remote(doomed), adds.remote(doomed)  # their input never comes
        for call in (first, second):  # both failed before anything cancels them
            with pytest.raises(RayServeException, match="upstream actor died") as raised:
                call.result(timeout_s=60)
            assert isinstance(_as_serving_error(raised.value), ShardUnavailable)
        with pytest.raises(RayServeException, match="upstream actor died"):
            first.cancel()  # the library's behaviour this guards against
        cancel(second)  # returns: the caller's own error goes on
    finally:
        serve.delete("upstream-dies", _blocking=False)
        serve.delete("upstream-adds", _blocking=False)


def test_a_shard_replica_killed_under_load_costs_no_request_with_two_replicas(deploy, tiny_packages, reference,
                                                                               tiny, helpers):
    from ray import serve

    client = deploy(tiny_packages("table-2"), "kill", shard_replicas=2, default_timeout_s=30)
    try:
        deadline = time.monotonic() + 120
        while len(replica_pids("kill", "shard-0")) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(replica_pids("kill", "shard-0")) == 2
        batches = [TrafficGenerator(tiny, seed=60 + i).batch(8) for i in range(8)]
        expected = [reference(b) for b in batches]
        outcomes: list[str] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                k = i % len(batches)
                i += 3
                try:
                    got = client.predict(batches[k].dense, helpers.as_sparse(batches[k]), timeout=30)
                    outcomes.append("OK" if np.allclose(got, expected[k], atol=FP16_TOL) else "WRONG")
                except grpc.RpcError as e:
                    outcomes.append(f"{e.code().name}: {e.details()}")

        threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(3)
        before = len(outcomes)
        os.kill(replica_pids("kill", "shard-0")[0], signal.SIGKILL)
        time.sleep(6)
        stop.set()
        for t in threads:
            t.join(60)
        assert len(outcomes) > before + 5, "load ran across the kill"
        failed = [o for o in outcomes if o != "OK"]
        assert failed == [], failed[:5]
    finally:
        serve.delete("kill", _blocking=False)
