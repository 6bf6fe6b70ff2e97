"""Fading schedules and the state of one feature, as pure transitions.

A schedule is a list of steps, each a coverage and a soak time::

    1.0 (soak 10m) -> 0.75 (10m) -> 0.5 (10m) -> 0.25 (10m) -> 0.0 (30m) -> done

States of a feature (``Status``)::

    running      the schedule advances to the next step once the current one has soaked
    paused       an operator stopped it; coverage stays where it is
    rolled_back  a guardrail breach (or an operator) put coverage back to the last safe
                 step; the schedule waits for ``resume``
    done         the last step soaked; at coverage 0 the feature's tables can be dropped
    manual       coverage set by hand (``set coverage``), no schedule is running

"Safe" coverage is the coverage of the last step that soaked without a breach (before
the first one: the coverage the feature had when the schedule started). Every function
here takes a state and returns the next one (or raises :class:`TransitionError`); the
store applies them atomically and audits the change. Times are seconds since the epoch.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any


class TransitionError(Exception):
    """The requested change is not allowed in the feature's current state."""


class Status(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    ROLLED_BACK = "rolled_back"
    DONE = "done"
    MANUAL = "manual"


@dataclass(frozen=True, kw_only=True)
class Step:
    coverage: float  # in [0, 1]
    soak_s: float  # seconds to hold this coverage before the next step

    def __post_init__(self) -> None:
        if not isinstance(self.coverage, (int, float)) or not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"steps[].coverage: must be in [0, 1], got {self.coverage!r}")
        if not isinstance(self.soak_s, (int, float)) or not math.isfinite(self.soak_s) or self.soak_s < 0:
            raise ValueError(f"steps[].soak_s: must be a finite number >= 0, got {self.soak_s!r}")


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Guardrail limits; a breach of any of them rolls the schedule back."""

    max_mean_shift: float = 0.05  # |mean score(faded) / mean score(control) - 1|
    max_psi: float = 0.10  # PSI of the faded vs the control score distribution
    max_latency_ratio: float = 1.5  # mean latency, requests with faded examples / without
    min_examples: int = 2000  # per cohort (faded and control) before scores are judged
    min_requests: int = 200  # per group before latency is judged

    def __post_init__(self) -> None:
        for name in ("max_mean_shift", "max_psi", "max_latency_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"thresholds.{name}: must be positive, got {v!r}")
        for name in ("min_examples", "min_requests"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"thresholds.{name}: must be a positive integer, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class Schedule:
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("steps: a schedule needs at least one step")
        covs = [s.coverage for s in self.steps]
        if any(b > a for a, b in zip(covs, covs[1:])):
            raise ValueError(f"steps: coverages must not increase along a fading schedule, got {covs}")

    @staticmethod
    def parse(coverages: str, soak: str | float) -> Schedule:
        """``"1,0.75,0.5,0.25,0"`` and a soak (``"10m"``, ``"30s"``, ``"1h"``, or seconds)
        for every step; or per step: ``"10m,10m,10m,10m,30m"``."""
        covs = [_float(c, "steps") for c in str(coverages).split(",") if c.strip()]
        soaks = [parse_duration(s) for s in str(soak).split(",") if s.strip()]
        if len(soaks) == 1:
            soaks = soaks * len(covs)
        if len(soaks) != len(covs):
            raise ValueError(f"soak: give one soak or one per step ({len(covs)}), got {len(soaks)}")
        return Schedule(steps=tuple(Step(coverage=c, soak_s=s) for c, s in zip(covs, soaks)))

    def __str__(self) -> str:
        return " -> ".join(f"{s.coverage:g} ({format_duration(s.soak_s)})" for s in self.steps)


@dataclass(frozen=True, kw_only=True)
class FeatureState:
    """Everything about one feature of one model being faded; the store persists it."""

    model: str
    feature: str
    coverage: float = 1.0  # current coverage of the treatment population
    status: Status = Status.MANUAL
    salt: str = ""  # keep-decision salt (a new salt draws a new set of units)
    control_fraction: float = 0.05  # share of units held out at full coverage
    schedule: Schedule | None = None
    thresholds: Thresholds = Thresholds()
    step: int = -1  # index of the current step, -1 without a schedule
    step_started_at: float = 0.0  # when the current step (or its resumed soak) began
    safe_step: int = -1  # last step that soaked clean, -1 none yet
    safe_coverage: float = 1.0  # coverage a rollback returns to
    updated_at: float = 0.0
    reason: str = ""  # why the last change was made

    @property
    def control_active(self) -> bool:
        """The control cohort is released once a schedule is done."""
        return self.status != Status.DONE

    @property
    def reclaimable(self) -> bool:
        """At coverage 0 with the schedule done: the tables can be dropped."""
        return self.status == Status.DONE and self.coverage == 0.0

    def soak_left(self, now: float) -> float:
        if self.schedule is None or self.step < 0 or self.status != Status.RUNNING:
            return 0.0
        return max(0.0, self.step_started_at + self.schedule.steps[self.step].soak_s - now)

    def summary(self) -> dict[str, Any]:
        """The audited view of a state: what an operator compares from -> to."""
        return {"coverage": self.coverage, "status": self.status.value, "step": self.step}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        if self.schedule is not None:
            out["schedule"] = {"steps": [dataclasses.asdict(s) for s in self.schedule.steps]}
        return out

    @staticmethod
    def from_json(raw: dict[str, Any]) -> FeatureState:
        raw = dict(raw)
        raw["status"] = Status(raw["status"])
        sched = raw.get("schedule")
        raw["schedule"] = None if sched is None else Schedule(steps=tuple(Step(**s) for s in sched["steps"]))
        raw["thresholds"] = Thresholds(**raw.get("thresholds", {}))
        return FeatureState(**raw)


def parse_duration(text: str | float) -> float:
    """``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip().lower()
        scale = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}.get(t[-1:], None)
        value = _float(t[:-1] if scale else t, "soak") * (scale or 1.0)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"soak: must be a duration >= 0, got {text!r}")
    return value


def format_duration(seconds: float) -> str:
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _float(text: str, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{field}: not a number: {text!r}") from None


# ---- transitions: state -> next state ------------------------------------------------


def start(
    current: FeatureState,
    schedule: Schedule,
    now: float,
    *,
    thresholds: Thresholds | None = None,
    control_fraction: float | None = None,
    salt: str | None = None,
) -> FeatureState:
    """Begin ``schedule`` at its first step. Refused while another schedule is running."""
    if current.status == Status.RUNNING:
        raise TransitionError(
            f"{current.model}/{current.feature}: a schedule is already running (pause or roll it back first)"
        )
    cf = current.control_fraction if control_fraction is None else control_fraction
    if not 0.0 <= cf < 1.0:
        raise ValueError(f"control_fraction: must be in [0, 1), got {cf!r}")
    return dataclasses.replace(
        current,
        status=Status.RUNNING,
        schedule=schedule,
        thresholds=thresholds or current.thresholds,
        control_fraction=cf,
        salt=current.salt if salt is None else salt,
        step=0,
        coverage=schedule.steps[0].coverage,
        step_started_at=now,
        safe_step=-1,
        safe_coverage=current.coverage,
        updated_at=now,
    )


def tick(current: FeatureState, now: float) -> FeatureState:
    """Advance a running schedule whose current step has soaked (no change otherwise)."""
    s = current
    if s.status != Status.RUNNING or s.schedule is None or s.soak_left(now) > 0:
        return s
    steps = s.schedule.steps
    clean = dataclasses.replace(s, safe_step=s.step, safe_coverage=steps[s.step].coverage, updated_at=now)
    if s.step == len(steps) - 1:
        return dataclasses.replace(clean, status=Status.DONE, reason="last step soaked")
    nxt = s.step + 1
    return dataclasses.replace(
        clean,
        step=nxt,
        coverage=steps[nxt].coverage,
        step_started_at=now,
        reason=f"step {s.step} soaked; step {nxt}",
    )


def pause(current: FeatureState, now: float) -> FeatureState:
    if current.status != Status.RUNNING:
        raise TransitionError(f"{current.model}/{current.feature}: cannot pause, status is {current.status.value}")
    return dataclasses.replace(current, status=Status.PAUSED, updated_at=now)


def resume(current: FeatureState, now: float) -> FeatureState:
    """Continue a paused or rolled-back schedule; the current step's soak starts over."""
    if current.status not in (Status.PAUSED, Status.ROLLED_BACK) or current.schedule is None:
        raise TransitionError(
            f"{current.model}/{current.feature}: cannot resume, status is {current.status.value}"
        )
    return dataclasses.replace(
        current,
        status=Status.RUNNING,
        coverage=current.schedule.steps[current.step].coverage,
        step_started_at=now,
        updated_at=now,
    )


def rollback(current: FeatureState, now: float) -> FeatureState:
    """Back to the last safe coverage; the schedule waits for ``resume``.

    Refused once the schedule is done (its soak at the last step has ended); coverage can
    still be raised with ``set_coverage`` as long as the served package has the tables.
    """
    s = current
    if s.schedule is None or s.status not in (Status.RUNNING, Status.PAUSED, Status.ROLLED_BACK):
        raise TransitionError(
            f"{s.model}/{s.feature}: cannot roll back, status is {s.status.value}"
            + (" (use set coverage)" if s.status in (Status.DONE, Status.MANUAL) else "")
        )
    return dataclasses.replace(
        s,
        status=Status.ROLLED_BACK,
        coverage=s.safe_coverage,
        step=max(s.safe_step, 0),
        updated_at=now,
    )


def set_coverage(current: FeatureState, coverage: float, now: float) -> FeatureState:
    """Set coverage by hand; any schedule stops (status manual)."""
    if not isinstance(coverage, (int, float)) or not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage: must be in [0, 1], got {coverage!r}")
    return dataclasses.replace(
        current,
        coverage=float(coverage),
        status=Status.MANUAL,
        schedule=None,
        step=-1,
        safe_step=-1,
        safe_coverage=float(coverage),
        updated_at=now,
    )
