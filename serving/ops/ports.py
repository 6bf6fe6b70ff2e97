"""The ports ``recserve serve`` needs, checked before anything is trained or deployed.

- The gRPC port is the one callers dial: it must be free. A taken one is refused with a
  message naming it and the flag that changes it; it is never shared (Serve's proxy would
  otherwise bind it with SO_REUSEPORT next to the other server and split the traffic).
- The Ray dashboard and Serve's HTTP port are conveniences: the one asked for if free,
  else any free one (printed with the addresses).

Standard library only (the CLI imports this before torch or Ray).
"""

from __future__ import annotations

import errno
import socket
import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
RAY_DASHBOARD_PORT = 8265  # Ray's default: asked for it, Ray itself moves to the next free one


class PortTaken(RuntimeError):
    """A port the operator asked for is in use; the message names it and the flag."""


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` on any address (IPv4 or IPv6).

    Binds without SO_REUSEPORT, so a server that shares its port (as Serve's proxy and
    grpc servers do by default) still counts as holding it; SO_REUSEADDR, so sockets left
    in TIME_WAIT by a server that just stopped do not."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                if e.errno == errno.EADDRNOTAVAIL:
                    continue
                raise
    return True


# Ports free_port() handed out lately in this process. Its probe socket is closed before the
# caller's server binds the port, so the kernel may hand the same port out again in between: two
# calls for one command line (--port, --http-port, --dashboard-port) could coincide, and did.
_HANDED_OUT: deque[int] = deque(maxlen=1024)
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = LOOPBACK, *, avoid: Collection[int] = ()) -> int:
    """A port nothing listens on now (the kernel's choice), other than ``avoid`` (ports chosen
    elsewhere and not bound yet) and other than the last 1024 this process was handed, so that
    the ports of one command line never coincide."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in avoid and port not in _HANDED_OUT:
                _HANDED_OUT.append(port)
                return port


def require_free(port: int, *, what: str, flag: str) -> int:
    """``port`` if it is free (0: any free port), else PortTaken naming it and ``flag``."""
    if port == 0:
        return free_port()
    if not 0 < port < 65536:
        raise PortTaken(f"{what} port {port} is not a port number (1-65535, or 0 for any free one); choose one with {flag} PORT")
    if not port_is_free(port):
        raise PortTaken(f"{what} port {port} is already in use (another server listens on it); "
                        f"choose another with {flag} PORT")
    return port


def hold_for_reuseport(port: int, host: str = LOOPBACK) -> socket.socket:
    """``host:port`` bound (not listening) with SO_REUSEPORT: until the returned socket is closed
    no other process can take the port, except servers that share it with SO_REUSEPORT as the
    Router replicas do (``--ingress shared``). ``recserve serve`` holds its gRPC port so while
    Ray starts: Ray's processes bind ports of their own meanwhile, and one of them took a free
    --port before the Router could bind it (seen in a benchmark: the start failed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except BaseException:
        s.close()
        raise
    return s


def free_or_fallback(port: int, *, avoid: Collection[int] = ()) -> int:
    """``port`` if it is free and not in ``avoid``, else a free one outside ``avoid``."""
    if 0 < port < 65536 and port not in avoid and port_is_free(port):
        return port
    return free_port(avoid=avoid)


@dataclass(frozen=True)
class ServePorts:
    """The ports of one ``recserve serve``: gRPC (required), dashboard and HTTP (fallbacks)."""

    grpc: int
    dashboard: int
    http: int
    asked_dashboard: int
    asked_http: int

    @classmethod
    def choose(cls, *, grpc: int, dashboard: int, http: int) -> ServePorts:
        grpc = require_free(grpc, what="gRPC", flag="--port")
        chosen_dashboard = free_or_fallback(dashboard, avoid={grpc})
        chosen_http = free_or_fallback(http, avoid={grpc, chosen_dashboard})
        return cls(grpc, chosen_dashboard, chosen_http, dashboard, http)

    @property
    def ray_dashboard_port(self) -> int | None:
        """What to pass to ``ray.init(dashboard_port=)``: None for Ray's default port, so the
        dashboard itself moves on to the next free port if another Ray takes 8265 between this
        check and its start (two starts at once); any other port as chosen."""
        return None if self.dashboard == RAY_DASHBOARD_PORT else self.dashboard

    def describe(self, host: str = LOOPBACK, *, http: bool = True) -> list[str]:
        """One line per port, saying where a taken preferred port was replaced (``http``: whether
        Serve's HTTP is served at all)."""
        return [
            f"gRPC          {host}:{self.grpc}",
            f"Serve HTTP    {host}:{self.http}{_moved(self.asked_http, self.http)}" if http else
            "Serve HTTP    off (--ingress shared: the Routers answer gRPC themselves, Serve runs no proxy)",
        ]

    def describe_dashboard(self, url: str) -> str:
        """The dashboard's line, from the URL Ray reports (``ray.init(...).dashboard_url``)."""
        port = int(url.rsplit(":", 1)[1]) if url and ":" in url else self.dashboard
        return f"Ray dashboard http://{url.split('://')[-1]}{_moved(self.asked_dashboard, port)}"


def _moved(asked: int, got: int) -> str:
    return "" if asked == got else f" ({asked} was taken: using a free port)"
