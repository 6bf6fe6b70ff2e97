"""Fixtures of the fading tests: a tiny model package served in-process, a fake clock."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from recserve.workloads import WorkloadConfig


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
def tiny_package(tmp_path_factory: pytest.TempPathFactory, tiny: WorkloadConfig, tiny_state_dict: Path) -> Path:
    """The trained tiny model exported with one table per shard."""
    from recserve.export import export_package
    from recserve.planning import plan_workload

    out = tmp_path_factory.mktemp("fading-pkg") / "tiny"
    plan = plan_workload(tiny, strategy="table", num_shards=len(tiny.tables))
    export_package(tiny, tiny_state_dict, out, plan=plan, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ranker(tiny_package: Path):
    """Every shard and the tower of the tiny package in this process (serving's LocalRanker)."""
    from serving.local_ranker import LocalRanker

    return LocalRanker.load(tiny_package)
