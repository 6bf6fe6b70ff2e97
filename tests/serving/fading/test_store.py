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


WRITER = """
import dataclasses, sys
from serving.fading.store import FadingStore

store = FadingStore(sys.argv[1])
n = store.get("m", "f").coverage if store.states("m") else 0.0
i = round(n * 1e6)
while True:  # each change: the state row and its audit row, one transaction
    i += 1
    store.transition("m", "f", lambda s: dataclasses.replace(s, coverage=i / 1e6), action="set",
                     actor="writer", reason="x" * (i % 500))
    print(i, flush=True)  # committed (synchronous=FULL): must survive the kill
"""


def test_the_store_survives_kills_in_the_middle_of_updates(tmp_path: Path) -> None:
    """SIGKILL a process committing changes as fast as it can, six times at random moments:
    each time the database opens intact (SQLite's write-ahead log rolls back the transaction in
    progress), every change the writer saw committed is there, and no change is half there
    (the state row and its audit trail agree)."""
    import os
    import random
    import signal
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    path = tmp_path / "fading.sqlite"
    rng = random.Random(7)
    committed = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(rng.randint(5, 60)):  # committed lines, then a kill at a random point after
                line = proc.stdout.readline()
                assert line, f"the writer exited {proc.wait()}"
                committed = int(line)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        store = FadingStore(path)
        state = store.get("m", "f")
        trail = store.audit("m", limit=1_000_000)  # oldest first
        assert round(state.coverage * 1e6) >= committed  # nothing the writer saw committed was lost
        assert trail[-1].to_state["coverage"] == state.coverage  # the state's own change is audited
        assert len(trail) == round(state.coverage * 1e6)  # one audit row per change, none half-written
        store.close()
