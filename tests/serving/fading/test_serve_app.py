"""Fading in the sharded Ray Serve app: the Router's feature filter is the fading step."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from recserve.synth import TrafficGenerator
from serving.fading import schedule as sched
from serving.fading.runtime import FadingFilter
from serving.fading.schedule import Schedule, Status, Thresholds
from serving.fading.store import FadingStore

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_the_served_app_fades_reports_guardrails_and_rolls_back(deploy, tiny_packages, tiny, tmp_path) -> None:
    from ray import serve

    from serving.engine.local_ranker import LocalRanker

    store = FadingStore(Path(os.environ["RECSERVE_FADE_STORE"]))
    package = tiny_packages("table-3")
    # float32 between deployments: the served scores are compared with the local ones to 1e-5
    client = deploy(package, "fading", feature_filter="serving.fading.runtime:router_filter", wire_dtype="float32")
    try:
        # 1. coverage 0.5 set through the store reaches the router: scores equal the faded local ones
        store.transition("tiny", "category", lambda s: sched.set_coverage(s, 0.5, time.time()),
                         action="set_coverage", actor="test")
        local_fading = FadingFilter("tiny", store, background=False)
        local = LocalRanker.load(package, feature_filter=local_fading)
        batch = TrafficGenerator(tiny, seed=77).batch(60)

        def served_equals_local() -> bool:
            got = client.predict(batch.dense, {f: (b.values, b.lengths) for f, b in batch.sparse.items()},
                                 unit_ids=batch.unit_ids, timeout=60)
            return np.allclose(got, local.score(batch), rtol=0, atol=1e-5)

        assert wait_for(served_equals_local)
        # 2. the router reports its guardrail figures to the store
        assert wait_for(lambda: any(f == "category" for _, m, f, _, _ in store.guardrail_figures("tiny")))
        # 3. a schedule on a feature whose removal shifts scores is rolled back by the router
        thresholds = Thresholds(max_mean_shift=0.15, max_psi=0.25, max_latency_ratio=100.0, min_examples=300)
        store.transition("tiny", "recent_items",
                         lambda s: sched.start(s, Schedule.parse("0.5,0", "1h"), time.time(), thresholds=thresholds,
                                               control_fraction=0.3),
                         action="start", actor="test")
        gen = TrafficGenerator(tiny, seed=78)

        def rolled_back() -> bool:
            b = gen.batch(64)
            client.predict(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()}, unit_ids=b.unit_ids,
                           timeout=60)
            return store.get("tiny", "recent_items").status == Status.ROLLED_BACK

        assert wait_for(rolled_back, timeout_s=60)
        (entry,) = [e for e in store.audit("tiny") if e.action == "breach"]
        assert entry.actor.startswith("guardrail:") and entry.to_state["coverage"] == 1.0
    finally:
        serve.delete("fading")
