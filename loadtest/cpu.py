"""CPU busy time of the processes that serve a configuration.

The compute overhead of the sharded stack is its CPU busy time (user + system, all
threads) over the monolithic server's for the same trace at the same rate. A
:class:`CpuMeter` sums ``psutil`` CPU times over a set of processes picked by a
selector; take a reading before and after a run and subtract.

Which processes count:
- monolith: the server process (and any children);
- Ray Serve: every replica (``ray::ServeReplica:<app>:<deployment>``:
  router, shards, dense tower) and the proxy (``ray::ProxyActor``);
  :func:`ray_serve_processes` finds them by the process title Ray sets, so the load
  generator needs no Ray import. The controller, raylet and GCS are reported apart
  (``ray_control_processes``) and not counted as serving compute.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Callable, Iterable

import psutil

Selector = Callable[[], list[psutil.Process]]

# substrings of the process titles Ray sets (Ray 2.60: "ray::ServeReplica:<app>:<deployment>" padded
# with spaces, "ray::ProxyActor", "ray::ServeController")
SERVE_TITLES = ("ServeReplica", "ray::ProxyActor", "HAProxy", "haproxy")  # haproxy: the HAProxy ingress
CONTROL_TITLES = ("ray::ServeController", "raylet", "gcs_server")


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def processes_titled(patterns: Iterable[str], within: int | None = None) -> list[psutil.Process]:
    """Ray processes whose title contains one of ``patterns`` (or whose executable is one).

    ``within``: only descendants of that pid (the ``recserve serve`` process that started
    Ray), so another Ray instance on the machine is never counted.
    """
    patterns = tuple(patterns)
    pool = process_tree(within) if within is not None else list(psutil.process_iter())
    out = []
    for p in pool:
        title = _cmdline(p)
        exe = title.split(" ", 1)[0].rsplit("/", 1)[-1]
        if (title.startswith("ray::") and any(x in title for x in patterns)) or exe in patterns:
            out.append(p)
    return out


def ray_serve_processes(within: int | None = None) -> list[psutil.Process]:
    return processes_titled(SERVE_TITLES, within)


def ray_control_processes(within: int | None = None) -> list[psutil.Process]:
    return processes_titled(CONTROL_TITLES, within)


def role_of(p: psutil.Process) -> str:
    """What a serving process does, for the per-process CPU column: the Serve deployment
    of a replica ("Router", "shard-0", "DenseTower"), "proxy", "haproxy", else "server"."""
    title = _cmdline(p)
    if title.startswith("ray::ServeReplica:"):  # Ray 2.60: "ray::ServeReplica:<app>:<deployment>", padded
        # while a replica runs an actor method Ray appends it ("...:shard-1.check_health")
        return re.sub(r"\.[a-z_][a-z0-9_]*$", "", title.split()[0].rsplit(":", 1)[1])
    if "ProxyActor" in title:
        return "proxy"
    exe = title.split(" ", 1)[0].rsplit("/", 1)[-1]
    if exe == "haproxy" or (title.startswith("ray::") and "haproxy" in title.lower()):
        return "haproxy"  # the binary (Serve's HAProxy ingress, recserve's front), not "--front haproxy"
    return "server"


def cpu_by_process(procs: Iterable[psutil.Process]) -> dict[int, tuple[str, float]]:
    """pid -> (title, CPU seconds user + system) of each of ``procs`` still alive: a reading of
    every process apart (benchmarks/idle_cpu.py, benchmarks/swap.py)."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (_cmdline(p), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    """``pid title`` of each process (for logs and for py-spy)."""
    return [f"{p.pid} {_cmdline(p)[:80]}" for p in procs]


@dataclass
class CpuMeter:
    """CPU seconds (user + system) of the processes ``select`` returns.

    A process seen in one reading and gone in the next keeps its last reading, so a
    process that exits mid-run is not subtracted.
    """

    select: Selector
    _last: dict[int, float] = field(default_factory=dict)
    _role: dict[int, str] = field(default_factory=dict)

    def read(self) -> float:
        for p in self.select():
            try:
                t = p.cpu_times()
                self._last[p.pid] = t.user + t.system
                if p.pid not in self._role:
                    self._role[p.pid] = role_of(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return sum(self._last.values())

    def read_by_role(self) -> dict[str, float]:
        """CPU seconds per :func:`role_of` (replicas of one deployment summed)."""
        self.read()
        out: dict[str, float] = {}
        for pid, s in self._last.items():
            role = self._role.get(pid, "server")
            out[role] = out.get(role, 0.0) + s
        return out

    def pids(self) -> list[int]:
        return [p.pid for p in self.select()]


def self_cpu_s() -> float:
    """CPU seconds of this process (the load generator)."""
    t = psutil.Process().cpu_times()
    return t.user + t.system
