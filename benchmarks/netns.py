"""Hosts of their own on this machine: one network namespace per host, joined by a delay line.

Every host is a network namespace (``ip netns``) with one TUN device, ``rsvt``, holding its own
address (10.213.0.K/24) and a 10 Gbit/s token-bucket cap on what it sends (``tc ... tbf``). A
*delay line* process holds each packet between two hosts for the one-way delay before handing
it to the destination's device: what ``tc qdisc ... netem delay`` does in the kernel.

Why a userspace delay line and not netem: this machine's kernel (a Firecracker guest,
6.18-fc) is built without ``CONFIG_NET_SCH_NETEM`` and has no loadable modules, so ``tc qdisc
add ... netem`` answers "Specified qdisc kind is unknown"; ``tbf`` and ``htb`` are built in,
so the rate cap is the kernel's. The delay line forwards only between the addresses it was
given (anything else is dropped and counted), so nothing leaves the namespaces it made, and it
counts the bytes each host sends to each other host (IP packet lengths: headers included).

    python benchmarks/netns.py cleanup     # namespaces left by a run that was killed (SIGKILL)

Used by benchmarks/network.py; root only (``ip netns`` and TUN devices need CAP_NET_ADMIN).
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "rsvnet"  # namespace names: rsvnet-<owner pid>-<host>
SUBNET = "10.213.0"  # host k (0-based) is 10.213.0.(k+1)/24
DEVICE = "rsvt"
MTU = 9000  # jumbo frames, as in a data centre
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PR_SET_TIMERSLACK = 29


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_namespace(ns: str, *, grace_s: float = 10.0) -> None:
    """End every process in ``ns``, then delete it."""
    stop_processes(ns, grace_s=grace_s)
    ip("netns", "del", ns, check=False)


def stop_processes(ns: str, *, grace_s: float = 10.0) -> None:
    """End every process in ``ns`` (SIGTERM, then SIGKILL after ``grace_s``): only processes of
    namespaces this module made, so only ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = netns_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class Fabric:
    """``hosts`` namespaces joined by a delay line; a context manager that removes them all.

    ``exec(host, cmd)`` is the command line that runs ``cmd`` in a host's namespace."""

    hosts: list[str]
    rate: str = "10gbit"
    owner: int = field(default_factory=os.getpid)
    line: subprocess.Popen | None = None

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{self.owner}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def exec(self, host: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def __enter__(self) -> Fabric:
        try:
            for host in self.hosts:
                ns = self.ns(host)
                ip("netns", "add", ns)
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "tuntap", "add", "dev", DEVICE, "mode", "tun")
                ip("-n", ns, "link", "set", DEVICE, "mtu", str(MTU), "up")
                ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", DEVICE)
                # a default route so that Ray finds its node address (it "connects" a UDP socket to
                # 8.8.8.8, which sends nothing); the delay line drops whatever is not for a host
                ip("-n", ns, "route", "add", "default", "dev", DEVICE)
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", DEVICE, "root", "tbf", "rate", self.rate,
                                "burst", "4mb", "latency", "20ms"], check=True, capture_output=True, text=True)
            spec = [f"{h}={self.ns(h)}={self.address(h)}" for h in self.hosts]
            # the line stands for wires and switches, which take no CPU from the hosts: it runs
            # ahead of the hosts' processes (nice -10) so that a busy machine delays it less
            self.line = subprocess.Popen(["nice", "-n", "-10", sys.executable, __file__, "line", *spec],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            ready = self.line.stdout.readline()
            if not ready.startswith("ready"):
                raise RuntimeError(f"delay line did not start: {ready!r}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.line is not None and self.line.poll() is None:
            self.line.terminate()
            try:
                self.line.wait(10)
            except subprocess.TimeoutExpired:
                self.line.kill()
        for host in self.hosts:
            kill_namespace(self.ns(host))

    def _ask(self, line: str) -> dict:
        assert self.line is not None
        self.line.stdin.write(line + "\n")
        self.line.stdin.flush()
        return json.loads(self.line.stdout.readline())

    def set_delay(self, one_way_ms: float) -> dict:
        return self._ask(f"delay {int(round(one_way_ms * 1000))}")

    def counters(self) -> dict:
        """Since the last call: {"bytes": {"h0>h1": N, ...}, "packets": {...}, "dropped": N,
        "held_us_p50": ..., "held_us_p99": ...} (how long the line held each packet)."""
        return self._ask("stats")


# ---- the delay line (a process of its own) ------------------------------------------------------

def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    return libc


def _open_tun(libc, ns: str) -> int:
    """The TUN device of namespace ``ns`` opened from this process (setns there and back)."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(there, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        libc.setns(here, CLONE_NEWNET)
        os.close(here)
        os.close(there)


def run_line(spec: list[str]) -> int:
    """Forward IPv4 packets between the TUN devices of ``spec`` (``ns=address`` each), each held
    for the current one-way delay. Commands on stdin, one JSON answer per line on stdout:
    ``delay MICROSECONDS``, ``stats``. ``spec``: ``host=namespace=address`` per host."""
    libc = _libc()
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # timers to the microsecond, not 50 us late
    by_addr: dict[bytes, int] = {}  # packed address -> its host's tun fd
    names: dict[bytes, str] = {}  # packed address -> host name
    for item in spec:
        host, ns, addr = item.split("=")
        by_addr[socket.inet_aton(addr)] = _open_tun(libc, ns)
        names[socket.inet_aton(addr)] = host
    delay_ns = 0
    queue: list[tuple[int, int, int, int, bytes]] = []  # (due, seq, arrived, out fd, packet)
    seq = 0
    sent_bytes: dict[str, int] = {}
    sent_packets: dict[str, int] = {}
    held: list[int] = []  # ns each packet was held (arrival to hand-over), since the last stats
    dropped = 0
    stdin = sys.stdin.fileno()
    print("ready", flush=True)
    watch = [stdin, *by_addr.values()]
    while True:
        now = time.monotonic_ns()
        timeout = None if not queue else max(0.0, (queue[0][0] - now) / 1e9)
        readable, _, _ = select.select(watch, [], [], timeout)
        for fd in readable:
            if fd == stdin:
                cmd = sys.stdin.readline().split()
                if not cmd:
                    return 0  # the owner went away
                if cmd[0] == "delay":
                    delay_ns = int(cmd[1]) * 1000
                    answer = {"delay_us": delay_ns // 1000}
                else:  # stats: since the last stats, then counting starts again
                    ordered = sorted(held)
                    answer = {"bytes": sent_bytes, "packets": sent_packets, "dropped": dropped,
                              "held_us_p50": ordered[len(ordered) // 2] / 1e3 if ordered else 0.0,
                              "held_us_p99": ordered[int(len(ordered) * 0.99)] / 1e3 if ordered else 0.0}
                    sent_bytes, sent_packets, held, dropped = {}, {}, [], 0
                print(json.dumps(answer), flush=True)
                continue
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[16:20] not in by_addr:
                    dropped += 1  # not IPv4 to one of the hosts: never leaves
                    continue
                key = f"{names.get(pkt[12:16], '?')}>{names[pkt[16:20]]}"
                sent_bytes[key] = sent_bytes.get(key, 0) + len(pkt)
                sent_packets[key] = sent_packets.get(key, 0) + 1
                seq += 1
                arrived = time.monotonic_ns()
                heapq.heappush(queue, (arrived + delay_ns, seq, arrived, by_addr[pkt[16:20]], pkt))
        now = time.monotonic_ns()
        while queue and queue[0][0] <= now:
            _, _, arrived, out, pkt = heapq.heappop(queue)
            os.write(out, pkt)
            if len(held) < 1_000_000:
                held.append(time.monotonic_ns() - arrived)


def cleanup() -> int:
    """Delete the namespaces of runs whose owner process is gone (a SIGKILLed run)."""
    for ns in ip("netns", "list").stdout.split():
        parts = ns.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and parts[1].isdigit():
            if not Path(f"/proc/{parts[1]}").exists():
                print(f"removing {ns} (owner {parts[1]} is gone)")
                kill_namespace(ns)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["line"]:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sys.exit(run_line(sys.argv[2:]))
    if sys.argv[1:2] == ["cleanup"]:
        sys.exit(cleanup())
    print(__doc__)
    sys.exit(2)
