"""Fixtures of the fading tests: a tiny model package served in-process, a fake clock."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


# The store the served app's router reads (router_filter -> default_store_path). Set at
# collection time, before the session's Ray instance starts, so Serve replicas inherit it
# and no test touches the checkout's artifacts/fading.sqlite.
SERVED_STORE = Path(tempfile.mkdtemp(prefix="recserve-fading-")) / "fading.sqlite"
os.environ.setdefault("RECSERVE_FADE_STORE", str(SERVED_STORE))


class FakeClock:
    """Seconds since the epoch that only move when a test says so."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def tiny_ranker(tiny_packages):
    """Every shard and the tower of the tiny model, one table per shard ("table-4"), in this
    process (serving's LocalRanker)."""
    from serving.engine.local_ranker import LocalRanker

    return LocalRanker.load(tiny_packages("table-4"))
