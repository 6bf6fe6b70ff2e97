"""Fading on the request path: the router's feature-filter step plus its guardrails.

The router holds one :class:`FadingFilter` per served model (``router_filter(manifest)``
is the factory ``AppArgs.feature_filter`` names) and, for every request::

    batch = fading(batch, request_id)          # before splitting by shard: a FadedBatch
    scores = ... score batch ...
    fading.observe(batch, scores, latency_s)   # after scoring: feeds the guardrails

``fading(batch)`` only reads an in-memory snapshot of the coverages; ``observe`` only
updates counters. Everything else (following state changes, advancing schedules whose
soak ended, testing the guardrails and rolling back on a breach, reporting figures)
happens on a background thread every ``poll_interval_s`` (0.5 s), so the request path
never waits on disk. ``sync()`` runs one round of it inline (tests,
benchmarks).

Every replica judges the guardrails on its own traffic; the first one to see a breach
rolls the feature back in the shared store (one transaction, audited with actor
``guardrail:<replica>``), and every replica follows within one poll interval.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from recserve.batch import Batch
from serving.fading import schedule as sched
from serving.fading.guardrails import FeatureGuardrail
from serving.fading.metrics import FadingMetrics
from serving.fading.policy import FadeDecision, FeatureFade, apply_fading
from serving.fading.schedule import FeatureState, Status
from serving.fading.store import FadingStore


@dataclass(frozen=True)
class FadedBatch(Batch):
    """A batch after the fading step, carrying what was decided for the guardrails."""

    decision: FadeDecision = FadeDecision({}, {})
    generation: int = 0  # which snapshot of the coverages decided it (stale results are not counted)


def content_request_id(batch: Batch) -> str:
    """A stand-in request id for callers that have none: a digest of the dense features,
    so the same request always gets the same treatment."""
    return "content:" + hashlib.blake2b(batch.dense.tobytes(), digest_size=8).hexdigest()


def _current_request_id() -> str:
    """The request id the server set for this request (serving.engine.routing.REQUEST_ID), if any."""
    import serving.engine.routing as routing

    var = getattr(routing, "REQUEST_ID", None)
    return var.get() if var is not None else ""


def replica_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def active_fade(state: FeatureState) -> FeatureFade | None:
    """What the request path applies for a state, or None when the feature is untouched."""
    if state.coverage >= 1.0 and state.status == Status.MANUAL:
        return None
    return FeatureFade(
        feature=state.feature,
        coverage=state.coverage,
        salt=state.salt,
        control_fraction=state.control_fraction if state.control_active else 0.0,
    )


class FadingFilter:
    """Applies the stored fading state of one model to its requests and guards it."""

    def __init__(
        self,
        model: str,
        store: FadingStore,
        *,
        features: tuple[str, ...] | None = None,  # the model's sparse features (others ignored)
        replica: str | None = None,
        poll_interval_s: float = 0.5,
        report_interval_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        metrics: FadingMetrics | None = None,
        background: bool = True,
    ):
        self.model = model
        self.store = store
        self.features = features
        self.replica = replica or replica_name()
        self.poll_interval_s = poll_interval_s
        self.report_interval_s = report_interval_s
        self.clock = clock
        self.metrics = metrics or FadingMetrics()
        self._lock = threading.Lock()
        self._states: dict[str, FeatureState] = {}
        self._fades: dict[str, FeatureFade] = {}  # swapped whole; read without the lock
        self._generation = 0  # bumped whenever the fades change
        self._guards: dict[str, FeatureGuardrail] = {}
        self._data_version: tuple | None = None
        self._last_report = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sync()
        if background:
            self._thread = threading.Thread(target=self._run, name=f"fading-{model}", daemon=True)
            self._thread.start()

    # ---- request path -------------------------------------------------------------------

    def __call__(self, batch: Batch, request_id: str = "") -> FadedBatch:
        """The fading step: faded features of each example become empty bags.

        The unit of an example is its unit id; without unit ids, the request id; without
        that either, a digest of the request's dense features."""
        generation = self._generation  # read before the fades (written after them): never newer
        fades = self._fades
        if not fades:
            return FadedBatch(batch.dense, batch.sparse, batch.unit_ids)
        if batch.unit_ids is None and not request_id:
            request_id = _current_request_id() or content_request_id(batch)
        out, decision = apply_fading(batch, self.model, fades, request_id=request_id)
        return FadedBatch(out.dense, out.sparse, out.unit_ids, decision, generation)

    def observe(self, batch: Batch, scores: np.ndarray, latency_s: float | None = None) -> None:
        """Feed the scores of a batch that went through the fading step to the guardrails."""
        decision = getattr(batch, "decision", None)
        if decision is None or not decision.cohorts:
            return
        scores = np.asarray(scores, dtype=np.float32)
        with self._lock:
            if getattr(batch, "generation", -1) != self._generation:
                return  # decided under coverages that have changed since: not this step's traffic
            for feature, cohorts in decision.cohorts.items():
                guard = self._guards.get(feature)
                if guard is None:
                    continue
                skipped = decision.lookups_skipped.get(feature, 0)
                guard.observe(cohorts, scores, latency_s, skipped)
                self.metrics.inc("lookups_skipped", self.model, feature, skipped)
        # the breach test runs on the background thread, every poll (not per request)

    # ---- background work ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.sync()
            except Exception as e:  # keep serving on the last state; retry next round
                print(f"fading[{self.model}]: background sync failed: {e}")

    def sync(self) -> None:
        """One round: roll back breaches, advance soaked steps, reload state, report."""
        now = self.clock()
        self._handle_breaches(now)
        for state in list(self._states.values()):
            if state.status == Status.RUNNING and state.soak_left(now) <= 0:
                self._data_version = None  # our own commits do not change our data_version
                self.store.transition(
                    self.model, state.feature, lambda s: sched.tick(s, now),
                    action="advance", actor=f"scheduler:{self.replica}", peer=self.replica, now=now,
                )
        self._reload()
        if now - self._last_report >= self.report_interval_s:
            self._report(now)

    def _handle_breaches(self, now: float) -> None:
        with self._lock:
            breaches = {
                f: why
                for f, g in self._guards.items()
                if (s := self._states.get(f)) is not None
                and s.status == Status.RUNNING
                and (why := g.breach(s.thresholds))
            }
            figures = {f: self._guards[f].figures(now).to_json() for f in breaches}
        for feature, why in breaches.items():
            expected = self._states[feature]
            self._data_version = None

            def roll(s: FeatureState, expected: FeatureState = expected) -> FeatureState:
                # only the step that was judged; if it moved on meanwhile, judge again later
                if s.status != Status.RUNNING or s.step != expected.step or s.coverage != expected.coverage:
                    return s
                return sched.rollback(s, now)

            new = self.store.transition(
                self.model, feature, roll, action="breach", actor=f"guardrail:{self.replica}",
                peer=self.replica, reason=f"guardrail breach at coverage {expected.coverage:g}: {why}", now=now,
            )
            if new.status == Status.ROLLED_BACK:
                self.metrics.inc("breaches", self.model, feature)
                self.store.report_figures(self.replica, self.model, {feature: figures[feature]}, now)

    def _reload(self) -> None:
        # data_version is per connection (one per thread), so remember whose it was
        version = (threading.get_ident(), self.store.data_version())
        if version == self._data_version and self._states:
            return
        states = {
            s.feature: s
            for s in self.store.states(self.model)
            if self.features is None or s.feature in self.features
        }
        fades = {f: fade for f, s in states.items() if (fade := active_fade(s)) is not None}
        with self._lock:
            for f, fade in fades.items():
                g, prev = self._guards.get(f), self._states.get(f)
                if g is None or prev is None or g.coverage != fade.coverage or prev.step != states[f].step:
                    self._guards[f] = FeatureGuardrail(fade.coverage, self.clock())  # a new step is judged afresh
            for f in list(self._guards):
                if f not in fades:
                    del self._guards[f]
            self._states = states
            changed = fades != self._fades
            self._fades = fades
            if changed:
                self._generation += 1
        self._data_version = version
        for f, s in states.items():
            self.metrics.set("coverage", self.model, f, s.coverage)

    def _report(self, now: float) -> None:
        with self._lock:
            figures = {f: g.figures(now) for f, g in self._guards.items()}
        for f, fig in figures.items():
            self.metrics.set("ratio", self.model, f, fig.ratio)
            self.metrics.set("psi", self.model, f, fig.psi)
            self.metrics.set("latency_ratio", self.model, f, fig.latency_ratio)
            self.metrics.set("lookups_skipped_per_s", self.model, f, fig.lookups_skipped_per_s)
        if figures:
            self.store.report_figures(self.replica, self.model, {f: x.to_json() for f, x in figures.items()}, now)
        self._last_report = now

    def figures(self) -> dict[str, dict]:
        now = self.clock()
        with self._lock:
            return {f: g.figures(now).to_json() for f, g in self._guards.items()}

    def states(self) -> dict[str, FeatureState]:
        return dict(self._states)

    def close(self) -> None:
        """Stop the background thread (the state in the store is untouched)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class RemoteStore:
    """The store as seen from a router on another node: through the FadingControl API.

    Follows the state with ``Status`` (one call per poll) and reports a guardrail breach
    with ``Rollback`` (audited under the router token's principal, with the figures in
    the reason). Schedules are advanced by the control plane's own scheduler, so
    ``advance`` is a no-op here; per-replica figures stay in the replica's metrics.
    """

    def __init__(self, address: str, token: str):
        from serving.fading.client import FadingClient

        self.client = FadingClient(address, token=token)
        self._polls = 0

    def data_version(self) -> tuple:
        self._polls += 1  # no cheap change counter over the API: reload on every poll
        return ("remote", self._polls)

    def states(self, model: str | None = None) -> list[FeatureState]:
        from serving.fading.proto import state_from_proto

        return [state_from_proto(s) for s in self.client.status(model or "").features]

    def transition(self, model, feature, change, *, action, actor, peer="", reason="", now=None) -> FeatureState:
        from serving.fading.proto import state_from_proto

        if action == "breach":
            return state_from_proto(self.client.rollback(model, feature, reason=f"{actor}: {reason}"))
        (s,) = self.client.status(model, feature).features
        return state_from_proto(s)

    def report_figures(self, replica, model, figures, now=None) -> None:
        pass


def router_filter(manifest) -> FadingFilter:
    """``AppArgs.feature_filter = "serving.fading.runtime:router_filter"``: fading for the
    manifest's model. With ``$RECSERVE_FADE_ADDR`` set (routers on other nodes than the
    control plane), state comes from the FadingControl API with ``$RECSERVE_FADE_TOKEN``;
    otherwise from the node's store file (``$RECSERVE_FADE_STORE``, default
    ``artifacts/fading.sqlite``)."""
    from serving.fading.client import ENV_ADDR
    from serving.fading.metrics import FadingMetrics
    from serving.fading.store import default_store_path

    if os.environ.get(ENV_ADDR):
        store = RemoteStore(os.environ[ENV_ADDR], os.environ.get("RECSERVE_FADE_TOKEN", ""))
    else:
        store = FadingStore(default_store_path())
    return FadingFilter(
        manifest.name,
        store,
        features=tuple(manifest.served_features),
        metrics=FadingMetrics(),
    )
