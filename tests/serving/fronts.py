"""Reading a running HAProxy front from the outside (tests of `recserve serve`'s front): the
HAProxy processes of a server's tree, its Predict server lines through the stats socket its
configuration names, and which process listens where."""

from __future__ import annotations

from pathlib import Path

import psutil


def haproxies_of(pid: int) -> list[psutil.Process]:
    """The HAProxy processes among ``pid``'s descendants."""
    return [p for p in psutil.Process(pid).children(recursive=True) if "haproxy" in p.name()]


def front_lines(front: psutil.Process) -> dict[str, dict]:
    """HAProxy's Predict server lines by address (``status``, ``calls``, ``in_flight``), through the
    stats socket its configuration names."""
    from serving.standalone.haproxy_front import servers_stats

    cfg = Path(front.cmdline()[front.cmdline().index("-f") + 1]).read_text()
    socket_path = next(line.split()[2] for line in cfg.splitlines() if "stats socket" in line)
    return {line["server"]: line for line in servers_stats(socket_path)}


def listeners(port: int) -> dict[str, int]:
    """Which process listens on ``port`` at each address ({"127.0.1.1": pid, ...})."""
    found = {}
    for p in psutil.process_iter():
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                    found[c.laddr.ip.removeprefix("::ffff:")] = p.pid  # gRPC's dual-stack sockets
        except psutil.Error:
            pass
    return found
