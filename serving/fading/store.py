"""The fading state store: SQLite in WAL mode at one path.

Why SQLite (WAL):
- Durable: a committed change is on disk (``synchronous=FULL``), so coverage and schedules
  survive a router or control-plane restart, and a crash mid-write leaves the last
  committed state.
- Shared: every process on the node opening the same path sees the same rows. All router
  replicas, the FadingControl server and ``recserve fade`` read one truth. WAL lets the
  many readers (routers polling) run while one writer commits.
- Atomic read-modify-write: each change runs in a ``BEGIN IMMEDIATE`` transaction (one
  writer at a time, others wait up to ``busy_timeout``), so two replicas that both see a
  step's soak end, or a guardrail breach racing an operator's pause, apply exactly one
  transition each, in order, each audited.
- Cheap to poll: ``PRAGMA data_version`` changes only when another connection commits, so
  a router checks for news in microseconds and rereads the rows only then.
- In the standard library, with the ``sqlite3`` shell for inspection; no daemon to run.

Multi-node: SQLite must not be shared over a network file system (its locks are not
reliable there). On a Ray cluster of several nodes, run the FadingControl server (and its
SQLite file) on one node, the head, and have routers elsewhere follow its state through
the ``Status`` RPC and report breaches through ``Rollback`` (``RemoteStore`` in runtime.py,
chosen by setting ``$RECSERVE_FADE_ADDR``); the schema below is plain SQL, so a Postgres
backend is a drop-in for a store that several nodes write directly.

Tables: ``features`` (one row per model and feature: coverage, status, version and the
whole state as JSON), ``audit`` (every change: who, from where, when, from -> to, why) and
``guardrails`` (the latest figures each router replica measured, per feature).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.fading.schedule import FeatureState

SCHEMA_VERSION = 1
ENV_STORE = "RECSERVE_FADE_STORE"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    model TEXT NOT NULL,
    feature TEXT NOT NULL,
    coverage REAL NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,          -- FeatureState as JSON
    PRIMARY KEY (model, feature)
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,             -- seconds since the epoch
    actor TEXT NOT NULL,          -- principal of the token, or guardrail:<replica>, scheduler
    peer TEXT NOT NULL,           -- where the call came from (gRPC peer, host:pid)
    model TEXT NOT NULL,
    feature TEXT NOT NULL,
    action TEXT NOT NULL,         -- start, pause, resume, rollback, set_coverage, advance, breach
    from_state TEXT NOT NULL,     -- JSON summary: coverage, status, step
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS guardrails (
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    feature TEXT NOT NULL,
    at REAL NOT NULL,
    figures TEXT NOT NULL,        -- Figures.to_json()
    PRIMARY KEY (replica, model, feature)
);
"""


class StoreError(Exception):
    """The store file cannot be opened or has an unknown schema."""


class NotFound(KeyError):
    """No state for this model and feature."""


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    peer: str
    model: str
    feature: str
    action: str
    from_state: dict[str, Any]
    to_state: dict[str, Any]
    reason: str


def default_store_path() -> Path:
    """``$RECSERVE_FADE_STORE``, else ``fading.sqlite`` in the artifacts directory
    (``$RECSERVE_ARTIFACTS`` or the checkout's ``artifacts/``), the same for every process."""
    if os.environ.get(ENV_STORE):
        return Path(os.environ[ENV_STORE]).resolve()
    from recserve.default_package import artifacts_dir

    return (Path(artifacts_dir()) / "fading.sqlite").resolve()


class FadingStore:
    """One store file; safe to use from several threads and processes at once."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 10.0):
        self.path = Path(path).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {row[0]}, this build reads {SCHEMA_VERSION}")

    # ---- connections ------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self._busy_ms / 1000, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: cannot open the fading store ({e})") from None
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL mode (got {mode!r}); is it on a network file system?")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection):
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, *_) -> None:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            if exc_type is None:
                self.local.commits = getattr(self.local, "commits", 0) + 1

    def _tx(self) -> FadingStore._Tx:
        tx = FadingStore._Tx(self._conn())
        tx.local = self._local
        return tx

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- reads ------------------------------------------------------------------------

    def data_version(self) -> tuple[int, int]:
        """Changes whenever anyone has committed (cheap to poll). SQLite's data_version
        counts other connections' commits; this thread's own are counted beside it."""
        pragma = int(self._conn().execute("PRAGMA data_version").fetchone()[0])
        return pragma, getattr(self._local, "commits", 0)

    def get(self, model: str, feature: str) -> FeatureState:
        row = self._conn().execute(
            "SELECT state FROM features WHERE model = ? AND feature = ?", (model, feature)
        ).fetchone()
        if row is None:
            raise NotFound(f"no fading state for model {model!r} feature {feature!r}")
        return FeatureState.from_json(json.loads(row[0]))

    def states(self, model: str | None = None) -> list[FeatureState]:
        """Every feature's state (of one model, or all), ordered by model and feature."""
        sql, args = "SELECT state FROM features", ()
        if model:
            sql, args = sql + " WHERE model = ?", (model,)
        rows = self._conn().execute(sql + " ORDER BY model, feature", args).fetchall()
        return [FeatureState.from_json(json.loads(r[0])) for r in rows]

    def audit(self, model: str | None = None, *, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, oldest first."""
        sql, args = "SELECT * FROM audit", ()
        if model:
            sql, args = sql + " WHERE model = ?", (model,)
        rows = self._conn().execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            AuditEntry(
                id=r[0], at=r[1], actor=r[2], peer=r[3], model=r[4], feature=r[5], action=r[6],
                from_state=json.loads(r[7]), to_state=json.loads(r[8]), reason=r[9],
            )
            for r in reversed(rows)
        ]

    def guardrail_figures(self, model: str | None = None) -> list[tuple[str, str, str, float, dict]]:
        """(replica, model, feature, at, figures) of every replica's latest report."""
        sql, args = "SELECT replica, model, feature, at, figures FROM guardrails", ()
        if model:
            sql, args = sql + " WHERE model = ?", (model,)
        rows = self._conn().execute(sql + " ORDER BY model, feature, replica", args).fetchall()
        return [(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    # ---- writes -----------------------------------------------------------------------

    def transition(
        self,
        model: str,
        feature: str,
        change: Callable[[FeatureState], FeatureState],
        *,
        action: str,
        actor: str,
        peer: str = "",
        reason: str = "",
        now: float | None = None,
    ) -> FeatureState:
        """Apply ``change`` to the feature's state atomically and audit it.

        A feature with no row starts from ``FeatureState(coverage=1.0, status=manual)``.
        ``change`` may raise (TransitionError, ValueError): nothing is written then. A change
        that returns the same state writes nothing and is not audited.
        """
        if not model or not feature:
            raise ValueError("model and feature: must be non-empty")
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(
                "SELECT state, version FROM features WHERE model = ? AND feature = ?", (model, feature)
            ).fetchone()
            if row is None:
                current, version = FeatureState(model=model, feature=feature, updated_at=now), 0
            else:
                current, version = FeatureState.from_json(json.loads(row[0])), row[1]
            new = change(current)
            if new == current:
                return current
            if reason:
                new = _with_reason(new, reason)
            db.execute(
                "INSERT INTO features (model, feature, coverage, status, version, state) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (model, feature) DO UPDATE SET coverage = excluded.coverage,"
                " status = excluded.status, version = excluded.version, state = excluded.state",
                (model, feature, new.coverage, new.status.value, version + 1, json.dumps(new.to_json())),
            )
            db.execute(
                "INSERT INTO audit (at, actor, peer, model, feature, action, from_state, to_state, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    now, actor, peer, model, feature, action,
                    json.dumps(current.summary() if row is not None else {}),
                    json.dumps(new.summary()),
                    new.reason,
                ),
            )
            return new

    def report_figures(self, replica: str, model: str, figures: dict[str, dict], now: float | None = None) -> None:
        """Record a router replica's latest guardrail figures (feature -> Figures JSON)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.executemany(
                "INSERT INTO guardrails VALUES (?, ?, ?, ?, ?) ON CONFLICT (replica, model, feature)"
                " DO UPDATE SET at = excluded.at, figures = excluded.figures",
                [(replica, model, f, now, json.dumps(fig)) for f, fig in figures.items()],
            )


def _with_reason(state: FeatureState, reason: str) -> FeatureState:
    return dataclasses.replace(state, reason=reason)
