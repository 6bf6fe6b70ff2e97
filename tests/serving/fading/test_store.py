"""The SQLite (WAL) store: durable across restarts, shared by replicas, every change audited."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from serving.fading import schedule as sched
from serving.fading.schedule import Schedule, Status, TransitionError
from serving.fading.service import advance_due
from serving.fading.store import FadingStore, NotFound


def start(store: FadingStore, now: float, feature: str = "f") -> None:
    store.transition(
        "m", feature, lambda s: sched.start(s, Schedule.parse("1,0.5,0", "60"), now),
        action="start", actor="alice", peer="ipv4:127.0.0.1:1", reason="retire f", now=now,
    )


def test_state_survives_a_restart_on_the_same_path(tmp_path: Path) -> None:
    path = tmp_path / "fading.sqlite"
    store = FadingStore(path)
    start(store, 100.0)
    advance_due(store, 160.0)
    before = store.get("m", "f")
    store.close()
    del store
    reopened = FadingStore(path)  # a new router / control-plane process
    assert reopened.get("m", "f") == before
    assert (before.coverage, before.status, before.step) == (0.5, Status.RUNNING, 1)
    assert [e.action for e in reopened.audit()] == ["start", "advance"]


def test_the_store_uses_write_ahead_logging(tmp_path: Path) -> None:
    FadingStore(tmp_path / "s.sqlite")
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_every_change_is_audited_with_who_when_from_where_and_from_to(tmp_path: Path) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    start(store, 100.0)
    store.transition("m", "f", lambda s: sched.pause(s, 110.0), action="pause", actor="bob", peer="ipv4:10.0.0.2:5", now=110.0)
    first, second = store.audit("m")
    assert (first.actor, first.action, first.at, first.reason) == ("alice", "start", 100.0, "retire f")
    assert first.from_state == {} and first.to_state == {"coverage": 1.0, "status": "running", "step": 0}
    assert (second.actor, second.peer, second.at) == ("bob", "ipv4:10.0.0.2:5", 110.0)
    assert second.from_state["status"] == "running" and second.to_state["status"] == "paused"


def test_a_refused_or_empty_change_writes_nothing(tmp_path: Path) -> None:
    store = FadingStore(tmp_path / "s.sqlite")
    start(store, 100.0)
    with pytest.raises(TransitionError):
        store.transition("m", "f", lambda s: sched.resume(s, 1.0), action="resume", actor="x")
    store.transition("m", "f", lambda s: sched.tick(s, 101.0), action="advance", actor="x")  # still soaking
    assert [e.action for e in store.audit()] == ["start"]
    with pytest.raises(NotFound):
        store.get("m", "other")


def test_replicas_that_race_to_advance_a_step_advance_it_once(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    start(FadingStore(path), 100.0)
    replicas = [FadingStore(path) for _ in range(8)]  # one connection per router replica
    barrier = threading.Barrier(len(replicas))

    def run(store: FadingStore) -> None:
        barrier.wait()
        advance_due(store, 160.0, actor="scheduler:replica")

    threads = [threading.Thread(target=run, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FadingStore(path).get("m", "f").step == 1
    assert [e.action for e in FadingStore(path).audit()] == ["start", "advance"]


def test_another_connection_sees_a_commit_through_data_version(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    reader, writer = FadingStore(path), FadingStore(path)
    v0 = reader.data_version()
    assert reader.data_version() == v0
    start(writer, 100.0)
    assert reader.data_version() != v0
    assert reader.get("m", "f").status == Status.RUNNING
