"""The servers under test, each started in its own process group and stopped afterwards.

- :class:`MonolithServer`: the whole model in one process behind a plain grpc.aio server
  (``serving.standalone.monolith``), started with ``recserve serve --monolith PACKAGE --port P
  --front none``: the bench compares data paths, so the monolith runs without the HAProxy front
  that `recserve serve --monolith` puts on its port by default (the sharded stack's door is in
  gRPC's core); the front under overload is benchmarks/overload.py's subject.
- :class:`ServeStack`: the sharded Ray Serve stack, started with ``recserve serve PACKAGE
  --port P --front none`` (a local Ray instance; the front only where its extra arguments ask for
  it, as for the monolith); stopped with SIGINT so it shuts
  Serve and Ray down, then anything of its process tree still alive is ended by pid.

Both listen on 127.0.0.1 only, say which processes do the serving (for the CPU meter and
for py-spy), and are ready when ``ModelInfo`` answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil

from loadtest.cpu import CpuMeter, describe, process_tree, ray_control_processes, ray_serve_processes
from recserve.v1 import ranker_pb2
from serving.api.wire import MODEL_INFO_METHOD
from serving.ops.ports import free_port


# the line both servers print (recserve serve): where their stage histograms are scraped
METRICS_LINE = r"recserve: metrics .* on http://(\S+)/metrics"


class TargetError(RuntimeError):
    """A server under test failed to start; the message says which and points at its log."""


def model_info(address: str, timeout_s: float = 5.0) -> ranker_pb2.ModelInfoResponse:
    """Ask the server at ``address`` which model it serves (raises grpc.RpcError)."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(
            MODEL_INFO_METHOD,
            request_serializer=ranker_pb2.ModelInfoRequest.SerializeToString,
            response_deserializer=ranker_pb2.ModelInfoResponse.FromString,
        )
        return call(ranker_pb2.ModelInfoRequest(), timeout=timeout_s)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class _Target:
    name: str
    address: str
    log_path: Path
    proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _wait_ready(self, timeout_s: float) -> ranker_pb2.ModelInfoResponse:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TargetError(
                    f"{self.name}: server exited with {self.proc.returncode} before answering; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                return model_info(self.address, timeout_s=2.0)
            except grpc.RpcError as e:
                last = e
                time.sleep(0.5)
        raise TargetError(
            f"{self.name}: no ModelInfo answer from {self.address} in {timeout_s:.0f}s ({last}); "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    port: int
    _port_chosen = False  # the port came from free_port(): another may replace it

    def _start(self, argv_of, env: dict[str, str], timeout_s: float) -> ranker_pb2.ModelInfoResponse:
        """Spawns ``argv_of()`` and waits for its first answer. When this object chose the port and
        the server refuses it as taken (another process bound it between free_port() and the
        server's own bind: parallel test workers ask the kernel for ports at once), it tries
        another, twice at most."""
        for attempt in range(3):
            self._spawn(argv_of(), env)
            try:
                return self._wait_ready(timeout_s)
            except TargetError as e:
                if not (self._port_chosen and "is already in use" in str(e)) or attempt == 2:
                    raise
                self._stop(grace_s=5)
                self.port = free_port()
                self.address = f"127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _stop(self, grace_s: float) -> None:
        if self.proc is None:
            return
        tree = process_tree(self.proc.pid)  # ours: started by us, in our session
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        gone, alive = psutil.wait_procs([p for p in tree if p.is_running()], timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._log.close()
        self.proc = None

    def serving_pids(self) -> list[int]:
        return self.cpu.pids()

    metrics_url: str | None = None  # the stage histograms (serving/engine/stages.py), once ready
    metrics_delay_s: float = 0.0  # how long a stage time takes to reach metrics_url

    def _find_metrics(self, pattern: str) -> None:
        """metrics_url from the server's log line matching ``pattern`` (group 1: host:port)."""
        import re

        for _ in range(40):  # the line may follow the first answer by a moment
            m = re.search(pattern, self.log_path.read_text(errors="replace"))
            if m:
                self.metrics_url = f"http://{m.group(1)}/metrics"
                return
            time.sleep(0.25)
        self.metrics_url = None


def feature_filter_of(serve_args: tuple[str, ...] = ()) -> str:
    """The feature filter both servers of a bench run (the ``--feature-filter`` value of
    ``recserve serve``): the one ``serve_args`` name, else ``none`` (``recserve serve`` itself
    defaults to fading; the bench compares equal work). tests/loadtest/test_targets.py parses
    both servers' command lines with ``recserve serve``'s own parser (flags from AppArgs) and
    fails if their filters differ."""
    args = list(serve_args)
    value = "none"
    for i, arg in enumerate(args):
        if arg == "--feature-filter" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--feature-filter="):
            value = arg.split("=", 1)[1]
    return value


def _on(env: dict[str, str], key: str) -> bool:
    return env.get(key, "").lower() in ("1", "true")


class MonolithServer(_Target):
    """The single-server baseline for ``package``."""

    def __init__(self, package: Path, *, log_dir: Path, port: int | None = None, ready_timeout_s: float = 300.0,
                 device: str = "cpu", feature_filter: str = "none", env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), name: str = "monolith"):
        self.name = name
        self.env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.feature_filter = feature_filter
        self.device = device
        self.package = Path(package)
        self.port, self._port_chosen = port or free_port(), port is None
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"{name}.log"
        self.ready_timeout_s = ready_timeout_s

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "recserve.cli", "serve", "--monolith", str(self.package), "--port", str(self.port),
                "--device", self.device, "--feature-filter", self.feature_filter, "--metrics-port", "0",
                "--front", "none", *self.extra_args]

    def __enter__(self) -> MonolithServer:
        self.cpu = CpuMeter(lambda: process_tree(self.proc.pid) if self.proc else [])
        self.info = self._start(self.argv, {**os.environ, **self.env}, self.ready_timeout_s)
        self._find_metrics(METRICS_LINE)
        return self

    def __exit__(self, *exc) -> None:
        self._stop(grace_s=15)


class ServeStack(_Target):
    """``recserve serve PACKAGE --port P``: the router, shards and dense tower on Ray Serve."""

    def __init__(
        self,
        package: Path,
        *,
        name: str,
        log_dir: Path,
        port: int | None = None,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        ready_timeout_s: float = 300.0,
        device: str = "cpu",
    ):
        self.name = name
        self.device = device
        self.package = Path(package)
        self.port, self._port_chosen = port or free_port(), port is None
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{name}.log"
        self.env = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s

    def argv(self) -> list[str]:
        """``recserve serve`` with this stack's arguments; its feature filter is
        :func:`feature_filter_of` the extra arguments (the monolith of a bench gets the same)."""
        argv = [sys.executable, "-m", "recserve.cli", "serve", str(self.package), "--port", str(self.port)]
        if "--http-port" not in self.extra_args:
            argv += ["--http-port", str(free_port())]  # never collide with another Serve on 8000
        if "--device" not in self.extra_args:
            argv += ["--device", self.device]
        # no HAProxy front unless the extra arguments (which come later, and win) ask for one: as
        # the monolith's, the bench compares data paths
        return argv + ["--front", "none", *self.extra_args, "--feature-filter", feature_filter_of(self.extra_args)]

    def __enter__(self) -> ServeStack:
        env = dict(os.environ)
        env.update(self.env)
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # the replicas run at the monolith's priority, nice 0: recserve serve sets it (SERVE_ENV)
        env.setdefault("RAY_metrics_report_interval_ms", "1000")  # stage histograms in ~2 s, not ~20 s
        if _on(env, "RAY_SERVE_ENABLE_HA_PROXY"):
            # HAProxy's frontend takes --port; the router replica's own ports (direct ingress,
            # which `recserve serve --ingress direct` would otherwise pin to --port) go to a free range
            grpc_port, http = free_port(), free_port()
            env.update(
                RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=str(grpc_port),
                RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=str(grpc_port + 1),
                RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(http),
                RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(http + 1),
            )
        self.cpu = CpuMeter(lambda: ray_serve_processes(within=self.proc.pid) if self.proc else [])
        self.control_cpu = CpuMeter(lambda: ray_control_processes(within=self.proc.pid) if self.proc else [])
        try:
            self.info = self._start(self.argv, env, self.ready_timeout_s)
        except TargetError:
            self._stop(grace_s=10)
            raise
        self._find_metrics(METRICS_LINE)
        self.metrics_delay_s = 3.0
        return self

    def processes(self) -> list[str]:
        return describe(ray_serve_processes(within=self.proc.pid)) if self.proc else []

    def __exit__(self, *exc) -> None:
        self._stop(grace_s=60)
