"""Fixtures for the load-test tests: bench options on the tiny workload and its package."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loadtest.bench import BenchOptions, ensure_package


@pytest.fixture(scope="session")
def tiny_bench_root(tmp_path_factory: pytest.TempPathFactory, tiny_state_dict: Path) -> Path:
    """An artifacts dir holding the session's trained tiny model where the bench looks for it."""
    root = tmp_path_factory.mktemp("bench")
    opts = BenchOptions(workload="tiny", max_rows=None, artifacts=root / "artifacts", out_dir=root / "out")
    opts.model_dir.mkdir(parents=True)
    shutil.copy(tiny_state_dict, opts.model_dir / "model.pt")
    return root


def _tiny_options(root: Path, **kw) -> BenchOptions:
    base = dict(
        workload="tiny", max_rows=None, artifacts=root / "artifacts", out_dir=root / "out",
        trace_size=50, warmup_requests=3, idle_s=1.0,
    )  # fmt: skip
    base.update(kw)
    return BenchOptions(**base)


@pytest.fixture(scope="session")
def bench_package(tiny_bench_root: Path, tiny_packages) -> Path:
    """The session's tiny package with every table on one shard (what the monolith loads),
    placed where the bench looks for it, so the bench finds it instead of exporting again."""
    opts = _tiny_options(tiny_bench_root)
    shutil.copytree(tiny_packages("singular-1"), opts.model_dir / "packages" / "singular-1")
    return ensure_package(opts, "singular", 1)


@pytest.fixture
def tiny_options(tiny_bench_root: Path):
    """BenchOptions(**overrides) for the tiny model, small trace, under the session's bench root."""
    return lambda **kw: _tiny_options(tiny_bench_root, **kw)


@pytest.fixture(scope="session")
def monolith(bench_package: Path):
    """A monolithic server for the tiny package, in this process (background thread)."""
    from serving.standalone.monolith import MonolithThread

    # these tests are of the senders and the locust user, not of admission control: the monolith
    # sheds only what cannot meet its deadline, never because this machine is slow at the moment
    with MonolithThread(str(bench_package), port=0, max_in_flight=256, max_latency_factor=None) as running:
        yield f"127.0.0.1:{running.port}"
