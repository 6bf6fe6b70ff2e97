"""The senders against a real monolithic server for the tiny model (127.0.0.1 only)."""

import asyncio

import numpy as np

from loadtest.driver import closed_loop, open_loop, warm_up
from serving.ops.ports import free_port
from loadtest.trace import make_trace


def test_open_loop_sends_at_the_offered_rate_and_every_request_is_answered(monolith, tiny):
    trace = make_trace(tiny, 30, seed=0)
    run = asyncio.run(open_loop(monolith, trace.payloads, rate=40.0, duration_s=1.5, arrivals="uniform"))
    assert len(run) == 60
    assert set(run.codes) == {"OK"}
    np.testing.assert_allclose(run.scheduled_s, np.arange(60) / 40.0, atol=1e-6)
    assert (run.latency_s >= run.service_s).all() and (run.service_s > 0).all() and np.isfinite(run.latency_s).all()
    assert (run.response_bytes > 0).all()
    np.testing.assert_array_equal(run.trace_index, np.arange(60) % 30)


def test_open_loop_stops_when_another_thread_says_so_and_keeps_every_answer(monolith, tiny):
    import threading

    trace = make_trace(tiny, 10, seed=0)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    # an hour at most: the run ends because of ``until``, whatever the machine's speed
    run = asyncio.run(open_loop(monolith, trace.payloads, rate=40.0, duration_s=3600.0, arrivals="uniform",
                                keep_responses=True, until=stop.is_set))
    assert 0 < len(run) < 200 and set(run.codes) == {"OK"}
    assert run.scheduled_s.max() < 5.0
    assert all(r is not None and len(r) > 0 for r in run.responses)


def test_closed_loop_stops_at_the_request_cap(monolith, tiny):
    trace = make_trace(tiny, 10, seed=0)
    # a duration no run here comes near: the run ends because of the cap, whatever the machine's speed
    run = asyncio.run(closed_loop(monolith, trace.payloads, concurrency=3, duration_s=600.0, max_requests=25))
    assert len(run) == 25 and set(run.codes) == {"OK"}


def test_missed_deadlines_are_counted_not_raised(monolith, tiny):
    trace = make_trace(tiny, 5, seed=0)
    run = asyncio.run(open_loop(monolith, trace.payloads, rate=50.0, duration_s=0.2, timeout_s=1e-6))
    # with 1 us left, a request behind another may also be shed at the door (RESOURCE_EXHAUSTED):
    # the server's admission, counted like the rest
    assert len(run) > 0 and set(run.codes) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "OK"}
    assert "DEADLINE_EXCEEDED" in run.codes


def test_a_server_that_is_not_there_gives_unavailable(tiny):
    trace = make_trace(tiny, 2, seed=0)
    codes = asyncio.run(warm_up(f"127.0.0.1:{free_port()}", trace.payloads, 2, timeout_s=2.0))
    assert codes == ["UNAVAILABLE", "UNAVAILABLE"]
