"""Slow calls on demand, for the admission tests on real servers (tests/serving/test_admission.py).

``slow_calls`` is a feature filter (``AppArgs.feature_filter`` "module:factory", importable in
a Serve replica: the session puts the checkout on PYTHONPATH) that sleeps ``SLOW_S`` in every
request whose request id starts with ``slow-`` and passes every other request through.
``poison_then_burst`` drives a server through slow calls, then a burst of ordinary ones."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from recserve.synth import TrafficGenerator
from serving.engine.routing import REQUEST_ID

FILTER = "tests.serving.admission_calls:slow_calls"
SLOW_S = 1.0


def slow_calls(manifest=None):
    def slow_if_asked(batch):
        if REQUEST_ID.get().startswith("slow-"):
            time.sleep(SLOW_S)
        return batch

    return slow_if_asked


def poison_then_burst(client, tiny, as_sparse, *, burst: int = 8, deadline_s: float = 10.0) -> list[str]:
    """Two slow warm-up calls, three ordinary ones, two more slow ones (4 examples each: 0.25 s
    per example), then ``burst`` concurrent ordinary 32-example requests with ``deadline_s``;
    the gRPC code of each burst request. An estimate the slow calls poisoned (an EWMA: about
    0.17 s per example) puts the second of them at 11 s and sheds it; the ordinary work takes
    well under a second."""
    gen = TrafficGenerator(tiny, seed=17)
    small, big = gen.batch(4), gen.batch(32)

    def call(batch, request_id: str, timeout: float = 60.0) -> str:
        try:
            client.predict(batch.dense, as_sparse(batch), request_id=request_id, timeout=timeout)
            return "OK"
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    for i, slow in enumerate([True, True, False, False, False, True, True]):
        assert call(small, f"{'slow' if slow else 'ordinary'}-{i}") == "OK"
    with ThreadPoolExecutor(burst) as pool:
        return list(pool.map(lambda i: call(big, f"burst-{i}", deadline_s), range(burst)))
