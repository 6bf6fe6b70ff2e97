"""Schedules: steps advance after their soak; pause, resume, rollback and manual coverage."""

from __future__ import annotations

import pytest

from serving.fading import schedule as sched
from serving.fading.schedule import FeatureState, Schedule, Status, TransitionError

T0 = 1_000.0


def started(steps: str = "1,0.5,0", soak: str = "60s") -> FeatureState:
    return sched.start(FeatureState(model="m", feature="f"), Schedule.parse(steps, soak), T0)


def test_a_schedule_steps_down_after_each_soak_and_ends_done_at_zero() -> None:
    s = started()
    assert (s.status, s.coverage, s.step) == (Status.RUNNING, 1.0, 0)
    assert sched.tick(s, T0 + 59) == s  # still soaking
    s = sched.tick(s, T0 + 60)
    assert (s.coverage, s.step, s.safe_coverage) == (0.5, 1, 1.0)
    s = sched.tick(s, T0 + 120)
    assert (s.coverage, s.step, s.safe_coverage) == (0.0, 2, 0.5)
    assert not s.reclaimable
    s = sched.tick(s, T0 + 180)
    assert s.status == Status.DONE and s.reclaimable and not s.control_active


def test_rollback_returns_to_the_last_step_that_soaked_clean_and_waits() -> None:
    s = sched.tick(sched.tick(started("1,0.75,0.5,0"), T0 + 60), T0 + 120)  # at 0.5, 0.75 was clean
    s = sched.rollback(s, T0 + 130)
    assert (s.status, s.coverage, s.step) == (Status.ROLLED_BACK, 0.75, 1)
    assert sched.tick(s, T0 + 10_000) == s  # a rolled-back schedule does not advance by itself
    s = sched.resume(s, T0 + 200)
    assert (s.status, s.coverage, s.step_started_at) == (Status.RUNNING, 0.75, T0 + 200)


def test_rollback_before_any_clean_step_returns_to_the_coverage_before_the_schedule() -> None:
    s = sched.set_coverage(FeatureState(model="m", feature="f"), 0.8, T0)
    s = sched.start(s, Schedule.parse("0.6,0.3", "60"), T0)
    assert sched.rollback(s, T0 + 1).coverage == 0.8


def test_pause_holds_coverage_and_resume_restarts_the_soak() -> None:
    s = sched.tick(started(), T0 + 60)
    p = sched.pause(s, T0 + 70)
    assert (p.status, p.coverage) == (Status.PAUSED, 0.5)
    assert sched.tick(p, T0 + 1_000) == p
    r = sched.resume(p, T0 + 1_000)
    assert r.soak_left(T0 + 1_000) == 60 and sched.tick(r, T0 + 1_059) == r


def test_changes_that_make_no_sense_in_the_current_state_are_refused() -> None:
    s = started()
    with pytest.raises(TransitionError, match="already running"):
        sched.start(s, Schedule.parse("1,0", "1"), T0)
    with pytest.raises(TransitionError, match="cannot resume"):
        sched.resume(s, T0)
    done = sched.tick(sched.tick(sched.tick(s, T0 + 60), T0 + 120), T0 + 180)
    with pytest.raises(TransitionError, match="set coverage"):
        sched.rollback(done, T0 + 200)
    with pytest.raises(TransitionError, match="cannot pause"):
        sched.pause(done, T0 + 200)


def test_set_coverage_stops_the_schedule_and_can_raise_coverage_after_done() -> None:
    done = sched.tick(sched.tick(sched.tick(started(), T0 + 60), T0 + 120), T0 + 180)
    s = sched.set_coverage(done, 1.0, T0 + 300)
    assert (s.status, s.coverage, s.schedule) == (Status.MANUAL, 1.0, None)


@pytest.mark.parametrize(
    ("steps", "soak", "field"),
    [("1,0.5,0.75", "1m", "increase"), ("1,x", "1m", "steps"), ("1,1.5", "1m", "coverage"),
     ("1,0", "-5", "soak"), ("1,0", "1m,2m,3m", "soak"), ("", "1m", "steps")],
)
def test_bad_schedules_are_rejected_naming_the_field(steps: str, soak: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Schedule.parse(steps, soak)


def test_state_round_trips_through_json() -> None:
    s = sched.tick(started(), T0 + 60)
    assert FeatureState.from_json(s.to_json()) == s
