"""Fading on the request path of a real (tiny, trained) model served in-process:
reversibility, automatic rollback on a guardrail breach, fading to done, replicas."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from recserve.synth import TrafficGenerator
from serving.fading import schedule as sched
from serving.fading.policy import FADED, KEPT
from serving.fading.reclaim import reclaim_report
from serving.fading.runtime import FadingFilter
from serving.fading.schedule import Schedule, Status, Thresholds
from serving.fading.store import FadingStore

MODEL = "tiny"
# Loose enough for a feature that barely matters, tight enough for one that does (see
# test_the_two_test_features_differ_as_the_guardrail_tests_assume).
THRESHOLDS = Thresholds(max_mean_shift=0.15, max_psi=0.25, max_latency_ratio=100.0, min_examples=1000)


def traffic(tiny, seed: int = 7, n: int = 40, size: int = 256):
    return [TrafficGenerator(tiny, seed=seed + i).batch(size) for i in range(n)]


def serve(ranker, fading: FadingFilter, batch):
    """The router's steps: fade, score, tell the guardrails."""
    t0 = time.perf_counter()
    faded = fading(batch)
    scores = ranker.score(faded)
    fading.observe(faded, scores, time.perf_counter() - t0)
    return scores, faded.decision, faded


def operator(store: FadingStore, feature: str, change, now: float, action: str = "set_coverage") -> None:
    store.transition(MODEL, feature, lambda s: change(s, now), action=action, actor="test", now=now)


def test_raising_coverage_back_restores_bit_identical_scores(tmp_path: Path, tiny, tiny_ranker, clock) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    fading = FadingFilter(MODEL, store, clock=clock, background=False)
    batches = traffic(tiny, n=4)
    full = [tiny_ranker.score(b) for b in batches]
    operator(store, "recent_items", lambda s, t: sched.set_coverage(s, 0.5, t), clock())
    fading.sync()
    moved = 0
    for b, ref in zip(batches, full):
        scores, decision, _ = serve(tiny_ranker, fading, b)
        kept = decision.cohorts["recent_items"] != FADED
        np.testing.assert_array_equal(scores[kept], ref[kept])  # kept examples: untouched
        moved += int((scores[~kept] != ref[~kept]).sum())
    assert moved > 0  # fading the feature did change the faded examples' scores
    operator(store, "recent_items", lambda s, t: sched.set_coverage(s, 1.0, t), clock())
    fading.sync()
    for b, ref in zip(batches, full):
        scores, _, _ = serve(tiny_ranker, fading, b)
        np.testing.assert_array_equal(scores, ref)


def test_the_two_test_features_differ_as_the_guardrail_tests_assume(tiny, tiny_ranker) -> None:
    from recserve.batch import Bags, Batch

    b = TrafficGenerator(tiny, seed=3).batch(8000)
    ref = tiny_ranker.score(b)
    for feature, shifts in (("recent_items", True), ("item_id", False)):
        sparse = dict(b.sparse, **{feature: Bags.empty(b.batch_size)})
        ratio = tiny_ranker.score(Batch(b.dense, sparse, b.unit_ids)).mean() / ref.mean()
        assert (abs(ratio - 1) > 2 * THRESHOLDS.max_mean_shift) == shifts, (feature, ratio)


def run_schedule(store, fading, ranker, tiny, clock, feature: str, *, rounds: int = 5, per_round: int = 24):
    """Start 1 -> 0.5 -> 0 (soak 60 s each) and serve traffic through every step."""
    operator(
        store, feature,
        lambda s, t: sched.start(s, Schedule.parse("1,0.5,0", "60"), t, thresholds=THRESHOLDS, control_fraction=0.2),
        clock(), action="start",
    )
    fading.sync()
    seed = 100
    for _ in range(rounds):
        for _ in range(per_round):
            serve(ranker, fading, TrafficGenerator(tiny, seed=seed).batch(256))
            seed += 1
        fading.sync()  # the background thread's round: breaches, then due steps
        clock.advance(61)
        fading.sync()
    return store.get(MODEL, feature)


def test_a_feature_whose_removal_shifts_scores_is_rolled_back_automatically(tmp_path, tiny, tiny_ranker, clock) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    fading = FadingFilter(MODEL, store, clock=clock, background=False, replica="router-1")
    state = run_schedule(store, fading, tiny_ranker, tiny, clock, "recent_items")
    assert state.status == Status.ROLLED_BACK and state.coverage == 1.0
    breach = [e for e in store.audit(MODEL) if e.action == "breach"]
    assert len(breach) == 1
    assert breach[0].actor == "guardrail:router-1"
    assert breach[0].from_state["coverage"] == 0.5 and breach[0].to_state == {"coverage": 1.0, "status": "rolled_back", "step": 0}
    assert "mean score ratio" in breach[0].reason or "PSI" in breach[0].reason
    assert fading.metrics.values[("breaches", MODEL, "recent_items")] == 1
    # rolled back to coverage 1: nobody is faded any more
    _, decision, _ = serve(tiny_ranker, fading, TrafficGenerator(tiny, seed=1).batch(512))
    assert not (decision.cohorts["recent_items"] == FADED).any()


def test_a_feature_whose_removal_barely_matters_fades_to_done_and_its_shard_is_not_called(
    tmp_path, tiny, tiny_ranker, clock
) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    fading = FadingFilter(MODEL, store, clock=clock, background=False)
    state = run_schedule(store, fading, tiny_ranker, tiny, clock, "item_id")
    assert state.status == Status.DONE and state.coverage == 0.0 and state.reclaimable
    assert [e.action for e in store.audit(MODEL)] == ["start", "advance", "advance", "advance"]
    # done: the control cohort is released, no example looks item_id up, its shard is idle
    _, decision, faded = serve(tiny_ranker, fading, TrafficGenerator(tiny, seed=1).batch(512))
    assert (decision.cohorts["item_id"] == FADED).all()
    item_shard = next(k for k, cols in tiny_ranker.routing.columns.items() if any(c.feature == "item_id" for c in cols))
    assert item_shard not in tiny_ranker.routing.split(faded)
    assert decision.lookups_skipped["item_id"] == 512
    report = reclaim_report(tiny_ranker.package.manifest, store.states(MODEL))
    assert report.reclaimable == ("item_id",) and report.tables == ("t_item",)
    t_item = next(t for t in tiny.tables if t.name == "t_item")
    assert report.shard_bytes[item_shard] == (t_item.rows * t_item.dim * 4,) * 2  # fp32: the whole shard is freed


def test_guardrail_figures_reach_the_store_and_the_metrics(tmp_path, tiny, tiny_ranker, clock) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    fading = FadingFilter(MODEL, store, clock=clock, background=False, replica="r1", report_interval_s=0)
    operator(store, "category", lambda s, t: sched.set_coverage(s, 0.5, t), clock())
    fading.sync()
    for b in traffic(tiny, n=5):
        serve(tiny_ranker, fading, b)
    fading.sync()
    ((replica, model, feature, _, fig),) = store.guardrail_figures(MODEL)
    assert (replica, model, feature, fig["coverage"]) == ("r1", MODEL, "category", 0.5)
    assert fig["examples"]["faded"] > 0 and fig["examples"]["control"] > 0 and fig["psi"] is not None
    assert fading.metrics.values[("coverage", MODEL, "category")] == 0.5
    assert fading.metrics.values[("lookups_skipped", MODEL, "category")] == fig["lookups_skipped"] > 0


def test_every_replica_follows_a_change_made_through_the_store(tmp_path, tiny, clock) -> None:
    path = tmp_path / "s.sqlite"
    replicas = [FadingFilter(MODEL, FadingStore(path), clock=clock, background=False) for _ in range(3)]
    operator(FadingStore(path), "user_id", lambda s, t: sched.set_coverage(s, 0.0, t), clock())
    batch = TrafficGenerator(tiny, seed=5).batch(1000)
    cohorts = []
    for r in replicas:
        r.sync()
        cohorts.append(r(batch).decision.cohorts["user_id"])
    for c in cohorts[1:]:
        np.testing.assert_array_equal(c, cohorts[0])  # same units faded on every replica
    assert (cohorts[0] == FADED).mean() > 0.9 and (cohorts[0] == KEPT).sum() == 0


def test_the_background_thread_picks_up_changes_without_blocking_requests(tmp_path, tiny) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    fading = FadingFilter(MODEL, store, poll_interval_s=0.05)
    try:
        batch = TrafficGenerator(tiny, seed=5).batch(100)
        assert fading(batch).sparse is batch.sparse
        store.transition(MODEL, "category", lambda s: sched.set_coverage(s, 0.0, time.time()), action="set_coverage", actor="t")
        deadline = time.time() + 5
        while fading(batch).sparse is batch.sparse and time.time() < deadline:
            time.sleep(0.02)
        assert fading(batch).sparse["category"].values.size < batch.sparse["category"].values.size
    finally:
        fading.close()


@pytest.mark.parametrize("feature", ["not_a_feature"])
def test_features_the_model_does_not_have_are_ignored(tmp_path, tiny, clock, feature: str) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    operator(store, feature, lambda s, t: sched.set_coverage(s, 0.0, t), clock())
    fading = FadingFilter(MODEL, store, features=tiny.features, clock=clock, background=False)
    batch = TrafficGenerator(tiny, seed=5).batch(10)
    assert fading(batch).sparse is batch.sparse


def test_the_fading_step_plugs_into_the_serving_pipeline_as_its_feature_filter(tmp_path, tiny, tiny_ranker, clock) -> None:
    from serving.engine.local_ranker import LocalRanker

    store = FadingStore(tmp_path / "s.sqlite")
    operator(store, "recent_items", lambda s, t: sched.set_coverage(s, 0.0, t), clock())
    fading = FadingFilter(MODEL, store, clock=clock, background=False)
    ranker = LocalRanker.load(tiny_ranker.package, feature_filter=fading)
    batch = TrafficGenerator(tiny, seed=9).batch(300)
    assert not np.array_equal(ranker.score(batch), tiny_ranker.score(batch))
    # the pipeline hands the scores back: the guardrails counted every example
    assert sum(fading.figures()["recent_items"]["examples"].values()) == 300


def test_without_unit_or_request_ids_the_same_request_gets_the_same_treatment(tmp_path, tiny, clock) -> None:
    import dataclasses

    store = FadingStore(tmp_path / "s.sqlite")
    operator(store, "category", lambda s, t: sched.set_coverage(s, 0.5, t), clock())
    fading = FadingFilter(MODEL, store, clock=clock, background=False)
    seen = set()
    for seed in range(20):
        batch = dataclasses.replace(TrafficGenerator(tiny, seed=seed).batch(50), unit_ids=None)
        a, b = fading(batch).decision.cohorts["category"], fading(batch).decision.cohorts["category"]
        np.testing.assert_array_equal(a, b)
        seen.add(int(a[0]))
    assert {KEPT, FADED} <= seen  # different requests do get different treatments


def test_a_router_on_another_node_follows_and_rolls_back_through_the_control_plane(tmp_path, tiny, tiny_ranker, clock) -> None:
    from serving.fading.client import FadingClient
    from serving.fading.runtime import RemoteStore
    from serving.fading.service import ControlThread

    tokens = {"tok-op": "alice", "tok-router": "router"}
    with ControlThread(FadingStore(tmp_path / "s.sqlite"), tokens=tokens, tick_interval_s=0) as control:
        address = f"127.0.0.1:{control.port}"
        with FadingClient(address, token="tok-op") as op:
            op.start(MODEL, "recent_items", Schedule.parse("0.5,0", "1h"), thresholds=THRESHOLDS, control_fraction=0.2)
        fading = FadingFilter(MODEL, RemoteStore(address, "tok-router"), clock=clock, background=False)
        assert fading.states()["recent_items"].coverage == 0.5
        for seed in range(24):
            serve(tiny_ranker, fading, TrafficGenerator(tiny, seed=500 + seed).batch(256))
        fading.sync()
        with FadingClient(address, token="tok-op") as op:
            (st,) = op.status(MODEL).features
            entries = list(op.audit(MODEL).entries)
    assert (st.status, st.coverage) == ("rolled_back", 1.0)
    assert entries[-1].actor == "router" and entries[-1].reason.startswith("guardrail:")


def test_results_decided_before_a_coverage_change_are_not_counted_for_the_new_step(tmp_path, tiny, tiny_ranker, clock) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    operator(store, "category", lambda s, t: sched.set_coverage(s, 0.5, t), clock())
    fading = FadingFilter(MODEL, store, clock=clock, background=False)
    in_flight = fading(TrafficGenerator(tiny, seed=3).batch(100))  # decided at 0.5
    operator(store, "category", lambda s, t: sched.set_coverage(s, 1.0 - 1e-9, t), clock())
    fading.sync()
    fading.observe(in_flight, tiny_ranker.score(in_flight), 0.01)  # its scores arrive after the change
    assert fading.figures()["category"]["examples"]["faded"] == 0
