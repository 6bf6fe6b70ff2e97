"""Reclaiming capacity: a feature done at coverage 0 can be dropped without changing a score."""

from __future__ import annotations

import numpy as np

from recserve.batch import Batch
from recserve.cli import main as recserve_main
from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.fading import schedule as sched
from serving.fading.runtime import FadingFilter
from serving.fading.schedule import Schedule
from serving.fading.store import FadingStore


def finish(store: FadingStore, model: str, feature: str) -> None:
    def change(s):
        s = sched.start(s, Schedule.parse("0", "0"), 100.0)
        return sched.tick(s, 100.0)

    store.transition(model, feature, change, action="start", actor="test")
    assert store.get(model, feature).reclaimable


def test_reclaim_reports_the_bytes_freed_per_shard_and_the_export_line(tmp_path, tiny, tiny_packages, capsys) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    finish(store, "tiny", "recent_items")
    store.transition("tiny", "category", lambda s: sched.set_coverage(s, 0.5, 1.0), action="set_coverage", actor="t")
    rc = recserve_main(["fade", "reclaim", "--package", str(tiny_packages("table-4")), "--store", str(tmp_path / "s.sqlite")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "reclaimable features: recent_items" in out and "tables dropped: t_hist" in out
    assert "category (manual, coverage 0.5)" in out
    t_hist = next(t for t in tiny.tables if t.name == "t_hist")
    assert f"{t_hist.rows * t_hist.dim * 4:,}" in out  # t_hist's fp32 bytes
    assert "--drop-features recent_items" in out


def test_dropping_a_done_feature_changes_no_score(tmp_path, tiny, tiny_state_dict, tiny_packages) -> None:
    from serving.engine.local_ranker import LocalRanker

    store = FadingStore(tmp_path / "s.sqlite")
    finish(store, "tiny", "recent_items")
    fading = FadingFilter("tiny", store, background=False)
    faded_ranker = LocalRanker.load(tiny_packages("table-4"), feature_filter=fading)
    out = tmp_path / "tiny-without-hist"
    rc = recserve_main([
        "export", "--workload", "tiny", "--state-dict", str(tiny_state_dict), "--out", str(out),
        "--strategy", "table", "--shards", "3", "--drop-features", "recent_items",
    ])
    assert rc == 0
    dropped = ModelPackage.open(out)
    assert "t_hist" not in dropped.manifest.plan.tables
    smaller = LocalRanker.load(dropped)
    for seed in range(3):
        batch = TrafficGenerator(tiny, seed=seed).batch(200)
        without = dict(batch.sparse)
        del without["recent_items"]  # the new package does not serve it
        np.testing.assert_array_equal(
            smaller.score(Batch(batch.dense, without, batch.unit_ids)), faded_ranker.score(batch)
        )
