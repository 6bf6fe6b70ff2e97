"""An adaptive limit on the requests a server works on at once: the door's depth at the knee of
its throughput, so that under overload the admitted requests wait behind no more calls than
the throughput needs, and the rest are refused at once. Ray-free and grpc-free (the Router's
gRPC door, serving/app/grpc_ingress.py, uses it).

A fixed depth is right for one machine and model only. The recommendation stack's throughput
rises with the requests in flight well past the point where its latency starts to rise, since
concurrent requests are coalesced into larger batches (2 cores, the default model: 41% of its
best at 1 in flight, 80% at 8, 98% at 12, 100% at 16, and the same at 32 at 2.3x the latency
of 16; benchmarks/results/overload-knee). A bound on latency therefore gives up most of the
throughput (measured: 42%); a fixed depth of 32 holds the throughput at 10-25x the unloaded
latency under overload. This limit looks for the smallest depth whose throughput is within
``tolerance`` of the best one measured, as a congestion controller probes for its bottleneck
rate (BBR), and moves there.

Only *saturated* stretches teach it: a window of ``window_s`` in which the door was full (every
slot working) at least ``saturated`` of the time and that answered at least as many calls as
there are slots, so the throughput measured is what that depth can do, not what the callers
offered, and a stalled server (hung calls, a stopped replica) changes nothing. A depth's throughput is the mean of ``per_step`` such
windows (one window's is too noisy to compare: +-10% on 2 cores). It goes in cycles:

1. *reference*: the throughput at a depth above the last knee (``max_limit`` at first);
2. *descend*: ``step_down`` (a quarter) lower at a time while the throughput stays within
   ``tolerance`` of the reference; the first depth below it ends the descent at the one before;
3. *settled* at that depth for ``hold_s``, then a new reference from half as deep again above it
   (at least two more); while each such reference answers more than ``tolerance`` above the
   settled depth, it climbs on by half again before descending, so that a knee that moved
   (larger requests, another version, a machine freed or busier) is found within a cycle.

A false drop (noise) ends a descent early, at a deeper door than needed: the throughput is kept
and the latency is what a deeper door costs, never the other way round.

Until the door is first saturated the limit is ``max_limit``: an idle or lightly loaded server
behaves as a fixed door, and a load below the capacity never lowers it.

Example::

    limit = KneeLimit(KneeConfig(max_limit=32))
    limit.observe(now, full=True)   # whenever the door fills or stops being full
    limit.completed(now)            # at each answered call
    limit.limit                     # the depth to admit up to now
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def may_wait(slots: int, max_queued: int, adaptive: bool = True) -> int:
    """Calls a door lets wait beside ``slots`` working: adaptive, a quarter as many, at least one,
    at most ``max_queued``; fixed, ``max_queued``."""
    return min(max_queued, max(1, slots // 4)) if adaptive else max_queued


@dataclass(frozen=True, kw_only=True)
class KneeConfig:
    """How the limit adapts. Validated on construction."""

    max_limit: int  # the fixed door's depth: the limit never exceeds it (and starts there)
    min_limit: int = 1
    window_s: float = 0.5  # a measurement window
    # the door full at least this share of a window's time: it counts (a coalesced batch answers
    # several calls at once, and their slots stay empty until the next arrivals: a door kept full by
    # an overload measured 61-71% full at 24 slots on 2 cores)
    saturated: float = 0.5
    per_step: int = 3  # saturated windows whose mean is a depth's throughput
    tolerance: float = 0.1  # a depth within this share of the reference throughput is enough
    step_down: float = 0.25
    hold_s: float = 20.0  # settled this long, then a new reference above

    def __post_init__(self) -> None:
        if self.max_limit < 1:
            raise ValueError(f"max_limit: must be at least 1, got {self.max_limit}")
        if not 1 <= self.min_limit <= self.max_limit:
            raise ValueError(f"min_limit: must be in 1..max_limit ({self.max_limit}), got {self.min_limit}")
        if not self.window_s > 0 or not self.hold_s > 0:
            raise ValueError(f"window_s and hold_s: must be > 0, got {self.window_s}, {self.hold_s}")
        for name in ("saturated", "tolerance", "step_down"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        if self.per_step < 1:
            raise ValueError(f"per_step: must be at least 1, got {self.per_step}")


@dataclass
class KneeStats:
    windows: int = 0  # saturated windows
    lowered: int = 0
    raised: int = 0
    cycles: int = 0  # references measured


@dataclass
class KneeLimit:
    """The limit and what it has measured. Not thread-safe: one event loop drives it."""

    config: KneeConfig
    stats: KneeStats = field(default_factory=KneeStats)

    def __post_init__(self) -> None:
        self._limit = self.config.max_limit
        self.phase = "reference"  # reference -> descend -> settled -> reference ...
        self.reference: float | None = None  # calls/s at the cycle's reference depth
        self._good = self._limit  # the last depth within tolerance in this descent
        self._good_rate: float | None = None  # and its calls/s
        self._knee_rate: float | None = None  # calls/s at the depth last settled at
        self._samples: list[float] = []  # saturated windows' calls/s at this depth
        self._settled_at = 0.0
        self._start: float | None = None  # the window's start
        self._done = 0  # calls answered in the window
        self._full_s = 0.0  # seconds of the window the door was full
        self._full_since: float | None = None  # the door full since then (None: not full)

    @property
    def limit(self) -> int:
        return self._limit

    def observe(self, now: float, *, full: bool) -> None:
        """The door is full (every slot working) or not, from ``now`` on."""
        if self._start is None:
            self._start = now
        if full and self._full_since is None:
            self._full_since = now
        elif not full and self._full_since is not None:
            self._full_s += now - self._full_since
            self._full_since = None
        self._maybe_close(now)

    def completed(self, now: float) -> None:
        """A call was answered at ``now``."""
        if self._start is None:
            self._start = now
        self._done += 1
        self._maybe_close(now)

    def _maybe_close(self, now: float) -> None:
        c = self.config
        span = now - self._start
        if span < c.window_s:
            return
        full = self._full_s + (now - self._full_since if self._full_since is not None else 0.0)
        # saturated, and every slot answered at least once: a stalled server (handlers hung, a
        # replica stopped) teaches nothing, rather than that no depth answers anything
        if full >= c.saturated * span and self._done >= self._limit:
            self.stats.windows += 1
            self._window(now, self._done / span)
        self._start, self._done, self._full_s = now, 0, 0.0
        self._full_since = now if self._full_since is not None else None

    def _window(self, now: float, rate: float) -> None:
        c = self.config
        if self.phase == "settled":
            if now - self._settled_at < c.hold_s:
                return
            up = self._above()
            self.phase, self.reference = "reference", None
            if up > self._limit:
                self.stats.raised += 1
                self._set(up)
                return  # this window was measured at the old depth
        self._samples.append(rate)
        if len(self._samples) < c.per_step:
            return
        measured = sum(self._samples) / len(self._samples)
        if self.phase == "reference":
            self.stats.cycles += 1
            up = self._above()
            if self._knee_rate is not None and measured > (1 + c.tolerance) * self._knee_rate and up > self._limit:
                self._knee_rate = measured  # more depth answered more: climb on before descending
                self.stats.raised += 1
                self._set(up)
                return
            self.reference, self._good, self._good_rate, self.phase = measured, self._limit, measured, "descend"
        elif measured >= (1 - c.tolerance) * self.reference:
            self.reference, self._good, self._good_rate = max(self.reference, measured), self._limit, measured
        else:  # below the tolerance: the depth before was the knee
            self._settle(now, self._good)
            return
        lower = max(c.min_limit, self._limit - max(1, math.floor(self._limit * c.step_down)))
        if lower < self._limit:
            self.stats.lowered += 1
            self._set(lower)
        else:
            self._settle(now, self._limit)

    def _above(self) -> int:
        """A reference depth above this one: half as deep again, at least two more, at most max_limit."""
        return min(self.config.max_limit, self._limit + max(2, math.ceil(self._limit / 2)))

    def _settle(self, now: float, depth: int) -> None:
        if depth > self._limit:
            self.stats.raised += 1
        self._knee_rate = self._good_rate
        self.phase, self._settled_at = "settled", now
        self._set(depth)

    def _set(self, depth: int) -> None:
        self._limit = depth
        self._samples = []
