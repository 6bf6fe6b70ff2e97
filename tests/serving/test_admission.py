"""Admission control (serving/engine/admission.py): a request is shed at the door when the work
ahead of it cannot be answered within its budget or the latency bound; an idle server
always admits. Driven by an explicit clock, so the arithmetic is exact."""

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
    """One request answered after ``seconds``."""
    ticket = admission.admit(examples, None)
    clock.now += seconds
    admission.done(ticket, answered=True)


def test_an_idle_server_admits_even_a_request_its_estimate_says_is_too_slow():
    clock = Clock()
    admission = Admission(AdmissionConfig(max_latency_factor=None), clock=clock)
    served(admission, clock, 100, 1.0)  # 10 ms per example
    ticket = admission.admit(100, budget_s=0.1)  # estimate 1 s > 0.1 s, but nothing is in flight
    assert admission.in_flight == 1 and ticket.idle


def test_a_request_that_cannot_finish_before_its_deadline_is_shed():
    clock = Clock()
    admission = Admission(AdmissionConfig(max_latency_factor=None), clock=clock)
    served(admission, clock, 10, 0.1)  # 10 ms per example
    admission.admit(10, budget_s=1.0)  # idle: admitted; now 10 examples in flight
    assert admission.estimate_s(10) == pytest.approx(0.2)
    admission.admit(10, budget_s=0.25)  # 10 ahead + 10 = 0.2 s <= 0.25 s
    with pytest.raises(Overloaded) as err:
        admission.admit(10, budget_s=0.25)  # 20 ahead + 10 = 0.3 s > 0.25 s
    assert err.value.code is Code.RESOURCE_EXHAUSTED and "estimated 300 ms" in err.value.message
    assert admission.stats.shed_slow == 1 and admission.in_flight == 2


def test_the_latency_bound_caps_the_queue_relative_to_the_idle_latency():
    clock = Clock()
    admission = Admission(AdmissionConfig(max_latency_factor=2.0), clock=clock)
    served(admission, clock, 10, 0.1)  # idle: 10 ms per example, 100 ms a request
    admission.admit(10, budget_s=10.0)  # idle: admitted
    admission.admit(10, budget_s=10.0)  # 10 ahead + 10 = 0.2 s = 2 x idle: admitted
    with pytest.raises(Overloaded, match="2x the idle latency"):
        admission.admit(10, budget_s=10.0)  # 20 ahead + 10 = 0.3 s > 0.2 s, though the deadline is far


def test_the_queue_is_bounded():
    admission = Admission(AdmissionConfig(max_in_flight=2))
    admission.admit(1, None)
    admission.admit(1, None)
    with pytest.raises(Overloaded, match="limit of 2 requests"):
        admission.admit(1, None)
    assert admission.stats.shed_full == 1


def test_only_answered_requests_teach_the_estimate_and_every_request_leaves():
    clock = Clock()
    admission = Admission(AdmissionConfig(), clock=clock)
    served(admission, clock, 10, 0.1)
    ticket = admission.admit(10, None)
    clock.now += 5.0
    admission.done(ticket, answered=False)  # failed after 5 s: not a service time
    assert admission.per_example.value == pytest.approx(0.01)
    assert admission.in_flight == 0 and admission.in_flight_examples == 0


def test_the_estimate_follows_load_as_an_ewma():
    clock = Clock()
    admission = Admission(AdmissionConfig(ewma_alpha=0.5), clock=clock)
    served(admission, clock, 10, 0.1)  # 0.01 s/example
    served(admission, clock, 10, 0.3)  # 0.03 s/example
    assert admission.per_example.value == pytest.approx(0.02)


def test_bad_settings_are_refused():
    for kwargs in ({"max_in_flight": 0}, {"max_latency_factor": 0.5}, {"ewma_alpha": 0.0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AdmissionConfig(**kwargs)


def test_a_light_load_is_never_shed_by_the_latency_bound():
    clock = Clock()
    admission = Admission(AdmissionConfig(max_latency_factor=1.0, min_in_flight=3), clock=clock)
    served(admission, clock, 10, 0.1)
    for _ in range(3):  # 0, 1, 2 in flight < 3: the latency bound does not apply yet
        admission.admit(10, None)
    with pytest.raises(Overloaded, match="idle latency"):
        admission.admit(10, None)  # 3 in flight: 40 ms estimated > 1 x 10 ms
