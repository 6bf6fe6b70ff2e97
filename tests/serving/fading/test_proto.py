"""serving/fading/proto.py: fading state survives the trip through its FadingControl
messages (all but the two fields the message does not carry), and requests that leave
thresholds unset get the defaults."""

from __future__ import annotations

import dataclasses

from recserve.v1 import fading_pb2
from serving.fading.proto import schedule_from_proto, state_from_proto, state_to_proto, steps_to_proto, thresholds_from_proto
from serving.fading.schedule import FeatureState, Schedule, Status, Thresholds


def test_a_feature_state_round_trips_through_its_status_message_except_soak_bookkeeping():
    running = FeatureState(
        model="tiny", feature="category", coverage=0.5, status=Status.RUNNING, salt="s1", control_fraction=0.1,
        schedule=Schedule.parse("1,0.5,0", "90s"), thresholds=Thresholds(max_psi=0.2, min_examples=10),
        step=1, step_started_at=1000.0, safe_step=0, safe_coverage=1.0, updated_at=1000.0, reason="started",
    )
    manual = FeatureState(model="tiny", feature="user_id", coverage=0.25, updated_at=5.0)
    for state in (running, manual):
        message = state_to_proto(state, [], now=1030.0)
        # step_started_at and safe_step stay in the store: the message carries soak_left instead
        assert state_from_proto(message) == dataclasses.replace(state, step_started_at=0.0, safe_step=-1)
        assert message.soak_left_seconds == state.soak_left(1030.0)
    assert state_to_proto(running, [], now=1030.0).soak_left_seconds == 60.0


def test_unset_thresholds_take_the_defaults_and_an_empty_step_list_is_no_schedule():
    assert thresholds_from_proto(fading_pb2.GuardrailThresholds()) == Thresholds()
    assert thresholds_from_proto(fading_pb2.GuardrailThresholds(max_psi=0.3)) == Thresholds(max_psi=0.3)
    assert schedule_from_proto([]) is None and steps_to_proto(None) == []
    schedule = Schedule.parse("1,0.75,0", "10m")
    assert schedule_from_proto(steps_to_proto(schedule)) == schedule
