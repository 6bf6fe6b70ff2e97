"""The one place where fading state meets its FadingControl messages
(protos/recserve/v1/fading.proto): schedules, thresholds and feature states, both ways.

The servicer (service.py) encodes states and decodes requests, the client (client.py)
encodes requests, and reclaim / rollback over the API (runtime.py, recserve/cli/fade.py) decode
states; all of them through these functions.
"""

from __future__ import annotations

import math

from recserve.v1 import fading_pb2
from serving.fading.schedule import FeatureState, Schedule, Status, Step, Thresholds


def steps_to_proto(schedule: Schedule | None) -> list[fading_pb2.FadeStep]:
    return [fading_pb2.FadeStep(coverage=s.coverage, soak_seconds=s.soak_s) for s in (schedule.steps if schedule else ())]


def schedule_from_proto(steps) -> Schedule | None:
    """``steps``: repeated FadeStep; None when there are none (no schedule)."""
    if not steps:
        return None
    return Schedule(steps=tuple(Step(coverage=x.coverage, soak_s=x.soak_seconds) for x in steps))


def thresholds_to_proto(t: Thresholds) -> fading_pb2.GuardrailThresholds:
    return fading_pb2.GuardrailThresholds(
        max_mean_shift=t.max_mean_shift, max_psi=t.max_psi, max_latency_ratio=t.max_latency_ratio,
        min_examples=t.min_examples, min_requests=t.min_requests,
    )


def thresholds_from_proto(t: fading_pb2.GuardrailThresholds) -> Thresholds:
    """A field left unset (0: every threshold must be positive) takes the default."""
    d = Thresholds()
    return Thresholds(
        max_mean_shift=t.max_mean_shift or d.max_mean_shift,
        max_psi=t.max_psi or d.max_psi,
        max_latency_ratio=t.max_latency_ratio or d.max_latency_ratio,
        min_examples=t.min_examples or d.min_examples,
        min_requests=t.min_requests or d.min_requests,
    )


def _nan(x) -> float:
    return math.nan if x is None else float(x)


def state_to_proto(s: FeatureState, figures: list[tuple[str, float, dict]], now: float) -> fading_pb2.FeatureFadeStatus:
    """``figures``: (replica, at, guardrail figures) of the replicas that reported on ``s``."""
    out = fading_pb2.FeatureFadeStatus(
        model=s.model,
        feature=s.feature,
        coverage=s.coverage,
        status=s.status.value,
        step=s.step,
        steps=steps_to_proto(s.schedule),
        soak_left_seconds=s.soak_left(now),
        safe_coverage=s.safe_coverage,
        control_fraction=s.control_fraction,
        salt=s.salt,
        thresholds=thresholds_to_proto(s.thresholds),
        updated_at=s.updated_at,
        reason=s.reason,
        reclaimable=s.reclaimable,
    )
    for replica, at, fig in figures:
        ex, mean = fig["examples"], fig["mean_score"]
        out.guardrails.append(
            fading_pb2.GuardrailFigures(
                replica=replica, at=at, coverage=fig["coverage"],
                control_examples=ex["control"], kept_examples=ex["kept"], faded_examples=ex["faded"],
                mean_control=_nan(mean["control"]), mean_kept=_nan(mean["kept"]), mean_faded=_nan(mean["faded"]),
                ratio=_nan(fig["ratio"]), ratio_kept=_nan(fig["ratio_kept"]), psi=_nan(fig["psi"]),
                latency_ratio=_nan(fig["latency_ratio"]), lookups_skipped=fig["lookups_skipped"],
                seconds=fig.get("seconds", 0.0),
            )
        )
    return out


def state_from_proto(s: fading_pb2.FeatureFadeStatus) -> FeatureState:
    """A FeatureFadeStatus message back to a FeatureState (for reclaim and rollback over the API)."""
    return FeatureState(
        model=s.model,
        feature=s.feature,
        coverage=s.coverage,
        status=Status(s.status),
        salt=s.salt,
        control_fraction=s.control_fraction,
        schedule=schedule_from_proto(s.steps),
        thresholds=thresholds_from_proto(s.thresholds),
        step=s.step,
        safe_coverage=s.safe_coverage,
        updated_at=s.updated_at,
        reason=s.reason,
    )
