"""Shared fixtures: the tiny workload, a tiny model trained once per test session, and its
packages under every sharding layout the tests use (each exported once, on first use).

Parallel runs (``make test``: pytest-xdist ``-n 2 --dist loadgroup``): every test file is one
group, so module and session fixtures are set up once per file's worker, and every test that
needs Ray (the session's Serve instance, or a ``ray``-marked test that starts its own) is in
ONE group, "ray", scheduled first: one Ray start-up per run, on one worker, while the other
worker runs everything else.

A hang or a crash fails the run fast and names the test (pyproject's [tool.pytest.ini_options],
the Makefile's ``--max-worker-restart=0``): every test has pytest-timeout's bound (``timeout``,
SIGALRM: xdist runs tests on its workers' main thread, so the signal method works and fails
only that test), every Ray test the larger RAY_TIMEOUT_S (it may start Ray and Serve, or deploy
an app, on a loaded machine) unless it sets its own ``@pytest.mark.timeout``; a hang that no
signal can interrupt (native code holding the GIL) is stopped by faulthandler's watchdog
(``faulthandler_timeout``, above every bound), which dumps every thread's stack and exits the
worker; a dead worker is reported as a failure of the test it was running, and ends the run.
"""

from __future__ import annotations

import os

# One torch (OpenMP) thread per test process, set before torch is first imported; inherited by
# the servers and Ray replicas the tests start. xdist runs two workers on CI's 2 cores: two
# spinning OpenMP threads each oversubscribe them, and on a loaded machine training the tiny
# model took 12 s with 2 threads, 2.5 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No Ray API call in a test process starts a Ray of its own (Ray's auto-init): every test that
# needs Ray starts it or attaches. A thread left calling Serve after the session's Ray stopped
# did (a refused version app's serve.run), and that second Ray's driver ended the xdist
# worker 60 s later, "Not properly terminated", in the middle of an unrelated test.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"

import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads TRITON_INTERPRET
# when a function is decorated, its own standard library (tl.cdiv, tl.sigmoid, ...) included,
# and that happens when triton is first imported: torchrec imports it, so any test module that
# imports the model (collected before tests/kernels/) would otherwise leave those helpers
# compiled-only ("Cannot call @triton.jit'd outside of the scope of a kernel"). Set here, before
# any test module is imported; inherited by the servers and replicas the tests start.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from recserve.workloads import WorkloadConfig, load_workload  # noqa: E402

# Hypothesis imports its target optimiser lazily, inside a test, deep in the stack; pytest
# rewrites it (ast.parse) there, and CPython 3.11.7's AST validator can then fail with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905, pytest #10763; seen in CI).
# Imported here, at the top of the stack, it is compiled before any test runs.
import importlib  # noqa: E402

importlib.import_module("hypothesis.internal.conjecture.optimiser")


RAY_FIXTURE = "serve_instance"  # tests/serving/conftest.py: the session's Ray + Serve
RAY_TIMEOUT_S = 600  # pytest-timeout's bound for a Ray test (others: pyproject's ``timeout``)


def _uses_session_ray(item: pytest.Item) -> bool:
    return RAY_FIXTURE in getattr(item, "fixturenames", ())


def _needs_ray(item: pytest.Item) -> bool:
    return _uses_session_ray(item) or item.get_closest_marker("ray") is not None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ray = [item for item in items if _needs_ray(item)]
    rest = [item for item in items if not _needs_ray(item)]
    # the session's Ray first, every test that uses it in one block: it is stopped after the
    # block's last test (tests/serving/conftest.py), so a test that starts its own Ray (a
    # ``ray``-marked file sorted between two that use it) must not split the block
    ray = [item for item in ray if _uses_session_ray(item)] + [item for item in ray if not _uses_session_ray(item)]
    items[:] = ray + rest  # the longest group first; order within each file kept
    for item in ray:
        item.add_marker(pytest.mark.xdist_group("ray"))
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(RAY_TIMEOUT_S))
    for item in rest:
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def tiny() -> WorkloadConfig:
    return load_workload("tiny")


@pytest.fixture(scope="session")
def tiny_state_dict(tmp_path_factory: pytest.TempPathFactory, tiny: WorkloadConfig) -> Path:
    """A tiny model trained briefly (seconds); its path to a torchrec state dict."""
    from recserve.train import train

    path = tmp_path_factory.mktemp("tiny-model") / "model.pt"
    train(tiny, path, steps=60, progress=False)
    return path


# layout name -> (strategy, shards, shard_memory). The capacity/load caps force row-wise splits
# of t_item and t_hist (160,000 bytes each; the four tables total 353,600 bytes in fp32).
TINY_LAYOUTS = {
    "singular-1": ("singular", 1, None),  # the whole model on one shard (the monolith's)
    "table-2": ("table", 2, None),
    "table-3": ("table", 3, None),
    "table-4": ("table", 4, None),  # one table per shard (fading: a faded table frees its shard)
    "capacity-1": ("capacity", 1, 400_000),
    "capacity-2": ("capacity", 2, 180_000),
    "capacity-3": ("capacity", 3, 130_000),
    "load-1": ("load", 1, None),
    "load-2": ("load", 2, 180_000),
    "load-3": ("load", 3, 130_000),
}


@pytest.fixture(scope="session")
def tiny_packages(tmp_path_factory: pytest.TempPathFactory, tiny: WorkloadConfig, tiny_state_dict: Path):
    """tiny_packages(layout) -> the trained tiny model exported (fp32) under that layout of
    TINY_LAYOUTS; each layout is exported once per session, on first use."""
    from recserve.export import export_package
    from recserve.planning import plan_workload

    root = tmp_path_factory.mktemp("tiny-packages")
    made: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in made:
            strategy, n, mem = TINY_LAYOUTS[layout]
            plan = plan_workload(tiny, strategy=strategy, num_shards=n, shard_memory=mem)
            made[layout] = export_package(tiny, tiny_state_dict, root / layout, plan=plan, progress=False).path
        return made[layout]

    return get


class _GroupSuffix:
    """``--dist loadgroup`` groups by an ``@group`` suffix that xdist 3.8 writes to the private
    ``item._nodeid``; pytest 9.2 builds the node id from ``item._id`` instead, so the suffix is
    lost and every test is scheduled alone (pytest-xdist issue #1386): the Ray tests ran on both
    workers, each starting Ray and Serve. Until xdist passes groups another way, write the
    suffix where pytest 9.2 reads it, after xdist's own hook, and fail loudly if it does not take."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not config.getoption("loadgroup", default=False):  # set by xdist only under --dist loadgroup
            return
        from _pytest.nodeid import NodeId

        for item in items:
            group = "_".join(sorted({str(m.args[0]) for m in item.iter_markers("xdist_group")}))
            if group and not item.nodeid.endswith(f"@{group}"):
                item._id = NodeId.parse(f"{item.nodeid}@{group}")
                if not item.nodeid.endswith(f"@{group}"):
                    raise pytest.UsageError(f"cannot give {item.nodeid} its xdist group {group!r} (pytest-xdist #1386)")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_GroupSuffix(), "recserve-xdist-group-suffix")
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        import tempfile

        os.environ["RECSERVE_XDIST_PIDS"] = tempfile.mkdtemp(prefix="recserve-xdist-")  # before workers start
        config.pluginmanager.register(_CrashReport(), "recserve-crash-report")


class _CrashReport:
    """A dead xdist worker explains itself: how it ended (exit status or signal: -9 is SIGKILL,
    the kernel's OOM killer among others), the machine's memory, the kernel log's last OOM lines
    where readable, and the tail of the Ray driver log the worker wrote (a driver whose raylet
    died leaves through Ray's quick exit, with no Python traceback). Worker stderr is the run's
    own, so a fatal signal's faulthandler traceback is printed above this."""

    @staticmethod
    def _returncode(node) -> int | None:
        popen = getattr(getattr(getattr(node, "gateway", None), "_io", None), "popen", None)
        if popen is None:
            return None
        try:
            return popen.wait(timeout=5)
        except Exception:  # still running, or not a subprocess gateway
            return None

    @pytest.hookimpl
    def pytest_testnodedown(self, node, error) -> None:
        if not error:
            return
        import glob
        import subprocess

        worker = node.gateway.id
        lines = [f"worker {worker} went down ({error}); exit status {self._returncode(node)}"]
        pid_file = _pid_dir() / f"{worker}.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else "?"
        lines.append(f"its pid {pid}; /proc/meminfo: " + " ".join(
            line.split(":")[0] + "=" + line.split(":")[1].strip()
            for line in Path("/proc/meminfo").read_text().splitlines()[:3]))
        try:
            kernel = subprocess.run(["dmesg", "-T"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            lines += [f"dmesg: {k}" for k in kernel if "oom" in k.lower() or "killed process" in k.lower()][-8:]
        except Exception as e:  # no dmesg, or not allowed
            lines.append(f"dmesg unreadable: {e}")
        for log in sorted(glob.glob(f"/tmp/ray/session_*/logs/python-core-driver-*_{pid}.log"))[-1:]:
            lines.append(f"tail of {log}:")
            lines += Path(log).read_text(errors="replace").splitlines()[-25:]
        print("\n".join(f"[crash report] {line}" for line in lines), flush=True)


def _pid_dir() -> Path:
    """Where each worker writes its pid: named by the controller, inherited by the workers."""
    return Path(os.environ["RECSERVE_XDIST_PIDS"])


def pytest_sessionstart(session: pytest.Session) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and "RECSERVE_XDIST_PIDS" in os.environ:  # the controller reads it if this worker dies
        _pid_dir().mkdir(parents=True, exist_ok=True)
        (_pid_dir() / f"{worker}.pid").write_text(str(os.getpid()))
