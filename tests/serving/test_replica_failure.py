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
