"""Admission control: shed a request at the door (RESOURCE_EXHAUSTED, answered at once) when
it cannot finish within its deadline, instead of letting it wait in a queue until the
deadline expires. Ray-free and grpc-free: the monolith and the Serve router both use it.

The estimate is queueing arithmetic over the server's own recent history::

    work ahead      = examples admitted and not answered yet (in flight), + this request's
    seconds/example = the MEDIAN over recent answered requests of latency / work ahead at
                      their admission
    seconds/request = the same per request ahead (requests in flight at admission, + itself)
    estimated time  = the smaller of  work ahead x seconds/example  and
                                      requests ahead x seconds/request

A request costs a fixed part (the calls, decoding, the hops) and a part per example; with
requests of one size the two estimates agree, and where sizes differ the split is not known,
so each estimate blames all of the cost on one of the two parts and the smaller is kept: a
request is shed only when the queue is too long under both. (Small slow requests, with every
example blamed for their fixed cost, made one estimate 8x too long for a burst of larger ones.)

``seconds/example`` is measured, not configured, so it covers whatever the server overlaps
(worker threads, pipelined shards and tower, batching). It is built so that a few slow calls
cannot poison it (a replica warming up, a busy machine, a GC pause): the first ``warmup``
answered requests teach nothing (lazy initialisation, compilation, cold caches); the
estimate is the median of the newest ``window`` samples, so slow samples move it only once
they are most of the recent history (real overload); samples older than ``max_age_s`` are
forgotten (an idle server's estimate decays to "no data" and is rebuilt from fresh
answers); and with fewer than ``min_samples`` samples it sheds nothing on the estimate.

A request is refused when

    - ``max_in_flight`` requests are already admitted (the bounded queue), or
    - something is in flight and the estimated time exceeds the request's remaining budget
      (its deadline), or -- once ``min_in_flight`` requests are in flight -- ``max_latency_factor``
      x the time the same request takes on an idle server (keeps admitted latency near the
      unloaded latency under overload; below ``min_in_flight`` the server is still learning
      how much it overlaps, and a light load is never shed).

A request is never shed when nothing but its own work stands between it and its deadline:
an idle server always admits (its answer refreshes the estimate, so a stale figure can never
shed everything). Example::

    admission = Admission(AdmissionConfig())
    ticket = admission.admit(examples=256, budget_s=0.2)   # raises Overloaded, or admits
    try:
        scores = score(batch)
        admission.done(ticket, answered=True)
    except BaseException:
        admission.done(ticket, answered=False)
        raise
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.api.errors import Overloaded


@dataclass(frozen=True, kw_only=True)
class AdmissionConfig:
    """How much a server admits. Validated on construction."""

    max_in_flight: int = 64  # bounded queue: requests admitted and not yet answered
    max_latency_factor: float | None = None  # estimated time <= factor x the idle time; None = deadline only
    min_in_flight: int = 2  # the latency factor applies from this many requests in flight on
    warmup: int = 2  # the first answered requests teach the estimate nothing (warm-up)
    window: int = 32  # the estimate is the median of this many newest samples
    min_samples: int = 3  # with fewer samples (in the window, not too old) nothing is shed on the estimate
    max_age_s: float = 120.0  # samples older than this are forgotten: the estimate decays while idle
    min_latency_s: float = 0.005  # the latency bound is never tighter than this (timer noise)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be at least 1, got {self.max_in_flight}")
        if self.min_in_flight < 1:
            raise ValueError(f"min_in_flight: must be at least 1, got {self.min_in_flight}")
        if self.max_latency_factor is not None and self.max_latency_factor < 1.0:
            raise ValueError(f"max_latency_factor: must be at least 1 (or None), got {self.max_latency_factor}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples: must be at least 1, got {self.min_samples}")
        if self.window < self.min_samples:
            raise ValueError(f"window: must be at least min_samples ({self.min_samples}), got {self.window}")
        if not self.max_age_s > 0:
            raise ValueError(f"max_age_s: must be > 0, got {self.max_age_s}")
        if self.min_latency_s < 0:
            raise ValueError(f"min_latency_s: must be >= 0, got {self.min_latency_s}")


@dataclass(frozen=True)
class Ticket:
    """One admitted request: what it waits behind (for the estimate) and when it came."""

    examples: int
    work_ahead: int  # examples in flight at admission, its own included
    requests_ahead: int  # requests in flight at admission, itself included
    admitted_at: float  # clock()
    idle: bool  # nothing else was in flight


@dataclass
class RecentMedian:
    """The (low) median of the newest ``window`` samples no older than ``max_age_s``; None
    with fewer than ``min_samples`` of them. Robust: slow samples move it only once they are
    more than half of the recent ones."""

    window: int
    min_samples: int
    max_age_s: float
    samples: deque = field(default_factory=deque)  # (time, value), oldest first

    def add(self, now: float, sample: float) -> None:
        self.samples.append((now, sample))
        if len(self.samples) > self.window:
            self.samples.popleft()

    def value(self, now: float) -> float | None:
        while self.samples and now - self.samples[0][0] > self.max_age_s:
            self.samples.popleft()
        if len(self.samples) < self.min_samples:
            return None
        return statistics.median_low(v for _, v in self.samples)  # of two middle samples, the faster


@dataclass
class AdmissionStats:
    admitted: int = 0
    shed_full: int = 0  # refused: max_in_flight reached
    shed_slow: int = 0  # refused: estimated time over the budget or the latency bound
    answered: int = 0  # admitted and answered (the first ``warmup`` of them teach nothing)


@dataclass
class Admission:
    """Thread-safe admission state of one server (or one router replica)."""

    config: AdmissionConfig = field(default_factory=AdmissionConfig)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0  # requests
        self.in_flight_examples = 0
        c = self.config
        # seconds per example of work ahead, loaded or not; and the same over requests admitted to an idle server
        self.per_example = RecentMedian(c.window, c.min_samples, c.max_age_s)
        self.per_request = RecentMedian(c.window, c.min_samples, c.max_age_s)  # the same, per request ahead
        self.idle_per_example = RecentMedian(c.window, c.min_samples, c.max_age_s)
        self.stats = AdmissionStats()

    def seconds_per_example(self) -> float | None:
        """The per-example estimate now (None: too few recent samples to shed on)."""
        return self.per_example.value(self.clock())

    def seconds_per_request(self) -> float | None:
        """The per-request estimate now (None: too few recent samples to shed on)."""
        return self.per_request.value(self.clock())

    def estimate_s(self, examples: int) -> float | None:
        """Estimated seconds until a request of ``examples`` admitted now is answered (None: no data yet)."""
        now = self.clock()
        per_example, per_request = self.per_example.value(now), self.per_request.value(now)
        if per_example is None or per_request is None:
            return None
        return min((self.in_flight_examples + examples) * per_example, (self.in_flight + 1) * per_request)

    def admit(self, examples: int, budget_s: float | None) -> Ticket:
        """Admit a request of ``examples`` with ``budget_s`` seconds left, or raise Overloaded."""
        examples = max(int(examples), 1)
        with self._lock:
            if self.in_flight >= self.config.max_in_flight:
                self.stats.shed_full += 1
                raise Overloaded(
                    f"server is at its limit of {self.config.max_in_flight} requests in flight; retry later")
            estimate = self.estimate_s(examples)
            if self.in_flight > 0 and estimate is not None:
                bound, why = self._bound(examples, budget_s)
                if bound is not None and estimate > bound:
                    self.stats.shed_slow += 1
                    raise Overloaded(
                        f"overloaded: estimated {estimate * 1000:.0f} ms to answer ({self.in_flight} requests, "
                        f"{self.in_flight_examples} examples ahead) exceeds {why} of {bound * 1000:.0f} ms; retry later")
            ticket = Ticket(examples=examples, work_ahead=self.in_flight_examples + examples,
                            requests_ahead=self.in_flight + 1, admitted_at=self.clock(), idle=self.in_flight == 0)
            self.in_flight += 1
            self.in_flight_examples += examples
            self.stats.admitted += 1
            return ticket

    def _bound(self, examples: int, budget_s: float | None) -> tuple[float | None, str]:
        bound, why = budget_s, "the remaining deadline"
        factor, idle = self.config.max_latency_factor, self.idle_per_example.value(self.clock())
        if factor is not None and idle is not None and self.in_flight >= self.config.min_in_flight:
            cap = max(factor * examples * idle, self.config.min_latency_s)
            if bound is None or cap < bound:
                bound, why = cap, f"{factor:g}x the idle latency"
        return bound, why

    def done(self, ticket: Ticket, *, answered: bool, expired: bool = False) -> None:
        """The request has left. Answered requests teach the estimate; so does one that
        ``expired`` (its deadline passed while it waited here): its time here is less than its
        service time would have been, so it is a sample the estimate must not be faster than.
        Without it only the requests fast enough to make their deadlines taught the estimate, and
        a queue that made most requests miss theirs went unseen: admission kept admitting them
        (the overload collapse of issue 22). Any other failure or cancel teaches nothing (it
        ended early, and would make the server look faster than it is)."""
        with self._lock:
            self.in_flight -= 1
            self.in_flight_examples -= ticket.examples
            if not (answered or expired):
                return
            self.stats.answered += answered
            if self.stats.answered <= self.config.warmup:
                return  # warm-up: its latency says how slow the first calls are, not the server
            now = self.clock()
            latency = max(now - ticket.admitted_at, 0.0)
            sample, per_request = latency / ticket.work_ahead, latency / ticket.requests_ahead
            if expired:  # "at least this": taught only where it says more than the estimate does
                self._at_least(self.per_example, now, sample)
                self._at_least(self.per_request, now, per_request)
                return
            self.per_example.add(now, sample)
            self.per_request.add(now, per_request)
            if ticket.idle:
                self.idle_per_example.add(now, sample)

    @staticmethod
    def _at_least(median: RecentMedian, now: float, sample: float) -> None:
        current = median.value(now)
        if current is None or sample > current:
            median.add(now, sample)
