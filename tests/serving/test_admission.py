"""Admission control (serving/engine/admission.py): a request is shed at the door when the work
ahead of it cannot be answered within its budget or the latency bound; an idle server
always admits; a few slow calls (warm-up, a busy machine) cannot poison the estimate.
Driven by an explicit clock, so the arithmetic is exact."""

from __future__ import annotations

import pytest

from serving.engine.admission import Admission, AdmissionConfig
from serving.api.errors import Code, Overloaded


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def served(admission: Admission, clock: Clock, examples: int, seconds: float) -> None:
    """One request answered after ``seconds`` on an idle server."""
    ticket = admission.admit(examples, None)
    clock.now += seconds
    admission.done(ticket, answered=True)


def learned(config: AdmissionConfig, per_example_s: float) -> tuple[Admission, Clock]:
    """An admission past its warm-up that has measured ``per_example_s`` (10-example requests)."""
    clock = Clock()
    admission = Admission(config, clock=clock)
    for _ in range(config.warmup + config.min_samples):
        served(admission, clock, 10, 10 * per_example_s)
    assert admission.seconds_per_example() == pytest.approx(per_example_s)
    return admission, clock


def test_an_idle_server_admits_even_a_request_its_estimate_says_is_too_slow():
    admission, _ = learned(AdmissionConfig(max_latency_factor=None), 0.01)
    ticket = admission.admit(100, budget_s=0.1)  # estimate 1 s > 0.1 s, but nothing is in flight
    assert admission.in_flight == 1 and ticket.idle


def test_a_request_that_cannot_finish_before_its_deadline_is_shed():
    admission, _ = learned(AdmissionConfig(max_latency_factor=None), 0.01)
    admission.admit(10, budget_s=1.0)  # idle: admitted; now 10 examples in flight
    assert admission.estimate_s(10) == pytest.approx(0.2)
    admission.admit(10, budget_s=0.25)  # 10 ahead + 10 = 0.2 s <= 0.25 s
    with pytest.raises(Overloaded) as err:
        admission.admit(10, budget_s=0.25)  # 20 ahead + 10 = 0.3 s > 0.25 s
    assert err.value.code is Code.RESOURCE_EXHAUSTED and "estimated 300 ms" in err.value.message
    assert admission.stats.shed_slow == 1 and admission.in_flight == 2


def test_the_latency_bound_caps_the_queue_relative_to_the_idle_latency():
    admission, _ = learned(AdmissionConfig(max_latency_factor=2.0), 0.01)  # idle: 100 ms a request
    admission.admit(10, budget_s=10.0)  # idle: admitted
    admission.admit(10, budget_s=10.0)  # 10 ahead + 10 = 0.2 s = 2 x idle: admitted
    with pytest.raises(Overloaded, match="2x the idle latency"):
        admission.admit(10, budget_s=10.0)  # 20 ahead + 10 = 0.3 s > 0.2 s, though the deadline is far


def test_a_light_load_is_never_shed_by_the_latency_bound():
    admission, _ = learned(AdmissionConfig(max_latency_factor=1.0, min_in_flight=3), 0.01)
    for _ in range(3):  # 0, 1, 2 in flight < 3: the latency bound does not apply yet
        admission.admit(10, None)
    with pytest.raises(Overloaded, match="idle latency"):
        admission.admit(10, None)  # 3 in flight: 400 ms estimated > 1 x 100 ms


def test_the_queue_is_bounded():
    admission = Admission(AdmissionConfig(max_in_flight=2))
    admission.admit(1, None)
    admission.admit(1, None)
    with pytest.raises(Overloaded, match="limit of 2 requests"):
        admission.admit(1, None)
    assert admission.stats.shed_full == 1


def test_only_answered_requests_teach_the_estimate_and_every_request_leaves():
    admission, clock = learned(AdmissionConfig(), 0.01)
    for _ in range(5):
        ticket = admission.admit(10, None)
        clock.now += 5.0
        admission.done(ticket, answered=False)  # failed after 5 s: not a service time
    assert admission.seconds_per_example() == pytest.approx(0.01)
    assert admission.in_flight == 0 and admission.in_flight_examples == 0


def test_warm_up_calls_teach_nothing_and_too_few_samples_shed_nothing():
    clock = Clock()
    admission = Admission(AdmissionConfig(warmup=2, min_samples=3), clock=clock)
    served(admission, clock, 61, 60.0)  # two warm-up calls of a minute each (1 s per example)
    served(admission, clock, 61, 60.0)
    assert admission.seconds_per_example() is None
    served(admission, clock, 61, 30.0)  # slow, and counted, but one sample is no evidence
    served(admission, clock, 61, 30.0)
    admission.admit(61, budget_s=30.0)
    admission.admit(61, budget_s=30.0)  # 61 ahead: admitted, nothing is shed on two samples
    assert admission.seconds_per_example() is None and admission.stats.shed_slow == 0


def test_a_few_slow_calls_cannot_make_a_61_example_request_look_like_35_s():
    """The CI failure of issue 17: slow calls (replicas warming up on a busy machine) poisoned
    an EWMA, and a 61-example request behind one other was shed with 30 s to spare."""
    admission, clock = learned(AdmissionConfig(), 0.002)  # 122 ms for 61 examples
    served(admission, clock, 61, 36.0)  # three very slow calls: 0.59 s per example
    served(admission, clock, 61, 36.0)
    served(admission, clock, 61, 36.0)
    for _ in range(2):  # then ordinary ones
        served(admission, clock, 61, 0.122)
    admission.admit(61, budget_s=30.0)  # one 61-example request in flight
    admission.admit(61, budget_s=30.0)  # 122 examples x 2 ms = 0.24 s, not 35 s: admitted
    assert admission.estimate_s(61) == pytest.approx(183 * 0.002)
    assert admission.stats.shed_slow == 0


def test_small_requests_with_a_fixed_cost_do_not_make_a_burst_of_larger_ones_look_slow():
    """Seen in CI at load 40: 4-example calls took 0.28 s each, almost all of it the fixed cost
    of a call, so per example they read 70 ms; a burst of 32-example requests with 10 s left
    was shed at "11 s" behind five others. Per request ahead the same history says 1.7 s."""
    admission, clock = learned(AdmissionConfig(), 0.07)  # 10-example requests, 0.7 s each
    for _ in range(5):
        admission.admit(32, budget_s=10.0)
    assert admission.estimate_s(32) == pytest.approx(6 * 0.7)  # not 192 examples x 70 ms = 13.4 s
    admission.admit(32, budget_s=10.0)
    assert admission.stats.shed_slow == 0


def test_a_queue_too_long_both_per_request_and_per_example_is_shed():
    admission, _ = learned(AdmissionConfig(), 0.01)  # 10-example requests, 0.1 s each
    for _ in range(4):
        admission.admit(10, budget_s=10.0)
    with pytest.raises(Overloaded, match="estimated 500 ms"):
        admission.admit(10, budget_s=0.45)  # 5 requests, 50 examples: 0.5 s both ways


def test_a_slowdown_that_lasts_is_learned_and_sheds():
    admission, clock = learned(AdmissionConfig(window=8), 0.002)
    for _ in range(5):  # most of the newest 8 samples: the server really is slower now
        served(admission, clock, 10, 1.0)  # 0.1 s per example
    assert admission.seconds_per_example() == pytest.approx(0.1)
    admission.admit(10, budget_s=30.0)
    with pytest.raises(Overloaded, match="remaining deadline"):
        admission.admit(10, budget_s=1.5)  # 20 examples x 0.1 s = 2 s > 1.5 s


def test_the_estimate_decays_while_idle_and_is_rebuilt_from_fresh_answers():
    admission, clock = learned(AdmissionConfig(max_age_s=60.0, window=8), 0.1)  # a slow past
    clock.now += 61.0  # idle for a minute: the old samples are forgotten
    assert admission.seconds_per_example() is None
    admission.admit(10, budget_s=1.0)
    admission.admit(10, budget_s=1.0)  # would be 2 s at the old 0.1 s per example: admitted
    assert admission.stats.shed_slow == 0
    for _ in range(3):
        served(admission, clock, 10, 0.1)  # the same clock: the two above are still in flight
    assert admission.seconds_per_example() == pytest.approx(0.1 / 30)  # 10 examples over 30 ahead


def test_bad_settings_are_refused():
    for kwargs in ({"max_in_flight": 0}, {"max_latency_factor": 0.5}, {"warmup": -1}, {"min_samples": 0},
                   {"window": 2}, {"max_age_s": 0.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AdmissionConfig(**kwargs)


# ---------------------------------------------------------------- through the real servers

def test_slow_calls_do_not_make_the_monolith_shed_ordinary_requests(tiny_packages, tiny, helpers):
    from serving.standalone.monolith import MonolithThread
    from serving.api.client import RankingClient

    from tests.serving.admission_calls import poison_then_burst, slow_calls

    with MonolithThread(tiny_packages("singular-1"), max_batch_size=helpers.max_batch,
                        feature_filter=slow_calls()) as srv, RankingClient(f"127.0.0.1:{srv.port}") as client:
        codes = poison_then_burst(client, tiny, helpers.as_sparse)
    assert codes == ["OK"] * len(codes), codes


def test_slow_calls_do_not_make_the_serve_router_shed_ordinary_requests(deploy, tiny_packages, tiny, helpers):
    from tests.serving.admission_calls import FILTER, poison_then_burst

    client = deploy(tiny_packages("singular-1"), "admission", max_batch_size=helpers.max_batch, feature_filter=FILTER)
    codes = poison_then_burst(client, tiny, helpers.as_sparse)
    assert codes == ["OK"] * len(codes), codes


def test_requests_that_expire_in_the_queue_teach_the_estimate_that_it_is_too_long():
    """Only answered requests taught the estimate, so when a queue made most requests miss their
    deadlines, only the few fast enough taught it, and admission kept admitting into the queue
    (the default stack's collapse past its maximum). An expired request teaches its time in the
    server as a lower bound: the estimate grows until the queue is shed."""
    admission, clock = learned(AdmissionConfig(window=8), 0.01)  # 10 examples in 0.1 s
    for _ in range(5):  # five requests waited out 1 s deadlines with 10 examples ahead each
        ticket = admission.admit(10, budget_s=1.0)
        clock.now += 1.0
        admission.done(ticket, answered=False, expired=True)
    assert admission.seconds_per_example() == pytest.approx(0.1)  # 1 s for 10 examples ahead
    admission.admit(10, budget_s=1.0)  # nothing in flight: always admitted
    with pytest.raises(Overloaded, match="remaining deadline"):
        admission.admit(10, budget_s=1.0)  # 20 examples x 0.1 s = 2 s > 1 s


def test_an_expired_request_never_makes_the_estimate_faster():
    admission, clock = learned(AdmissionConfig(window=8), 0.01)
    for _ in range(20):  # callers with 5 ms deadlines: their expiries say "at least 5 ms", nothing more
        ticket = admission.admit(10, budget_s=0.005)
        clock.now += 0.005
        admission.done(ticket, answered=False, expired=True)
    assert admission.seconds_per_example() == pytest.approx(0.01)
    assert admission.stats.answered == admission.config.warmup + admission.config.min_samples


def test_past_its_slots_and_queue_the_router_refuses_at_the_door(deploy, tiny_packages, tiny, helpers):
    """max_in_flight requests working (1) and max_queued waiting (1): the next are answered
    RESOURCE_EXHAUSTED by Serve before the router's Python runs, at once, not after waiting for a
    slot. (Without the door, past the stack's maximum the queue in front of the router grew until
    most requests waited out their deadlines: docs/reliability.md.)"""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from recserve.synth import TrafficGenerator
    from tests.serving.admission_calls import FILTER, SLOW_S

    client = deploy(tiny_packages("singular-1"), "door", max_batch_size=helpers.max_batch, feature_filter=FILTER,
                    max_in_flight=1, max_queued=1)
    batch = TrafficGenerator(tiny, seed=23).batch(4)

    def call(request_id: str) -> tuple[str, float]:
        started = time.monotonic()
        try:
            client.predict(batch.dense, helpers.as_sparse(batch), request_id=request_id, timeout=60)
            return "OK", time.monotonic() - started
        except grpc.RpcError as e:
            return e.code().name, time.monotonic() - started

    assert call("warm")[0] == "OK"
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(call, "slow-holds-the-slot")  # SLOW_S in the router's filter
        time.sleep(SLOW_S / 4)
        others = list(pool.map(call, [f"other-{i}" for i in range(3)]))
        assert slow.result()[0] == "OK"
    assert sorted(code for code, _ in others) == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"], others  # one queued
    assert all(seconds < SLOW_S / 2 for code, seconds in others if code != "OK"), others  # at the door, at once
    assert call("after")[0] == "OK"
