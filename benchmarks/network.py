"""What the network between hosts costs (issue 21): the sharded stack over Ray nodes in network
namespaces of their own, against the same stack on one node and against the monolith.

    sudo python benchmarks/network.py run --package artifacts/default --out benchmarks/results/network

Hosts are namespaces joined by a delay line (benchmarks/netns.py: 10.213.0.K addresses, a
10 Gbit/s tbf cap, the one-way delay added in userspace because this kernel has no netem).
Each Ray node is ``ray start`` inside its host's namespace; ``recserve serve --address
--place-on-hosts`` deploys as a user would. Phases, one after the other:

1. sharded, 1 node: Ray head h0 holds router, tower and every shard (no traffic between hosts);
2. monolith: ``recserve serve --monolith`` in h0;
3. sharded, 2 nodes: head h0 (router, tower, gRPC ingress) and h1 (every shard), at each
   one-way delay (0, 0.1, 0.5, 2 ms by default; the delay changes, the stack stays up).

Each phase: an open loop at one offered rate (the same for every phase: --rate, or 40% of the
1-node closed-loop throughput) for P50/P99, then a closed loop (--concurrency clients) for the
most examples/s; both bounded in requests and seconds. The load client runs in h0 and sends
only to h0's gRPC port. Bytes between hosts are the delay line's count (IP packets, both
directions), less what the idle stack sends in the same time (Ray's heartbeats). CPU: all
processes of the namespaces but the client (psutil). Everything made is removed on exit, on
failure and on SIGINT/SIGTERM (``python benchmarks/netns.py cleanup`` after a SIGKILL).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from multinode import ServeProcess  # noqa: E402
from netns import Fabric, stop_processes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT = 6379  # inside the namespaces: no other Ray there
GRPC_PORT = 21000


def ray_start(fabric: Fabric, host: str, tmp: Path, *, memory: int, head: bool) -> None:
    """``ray start`` inside ``host``'s namespace: the head, or a node joining it."""
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--node-ip-address", fabric.address(host),
           "--num-cpus", "2", "--memory", str(memory), "--object-store-memory", str(200 * 2**20),
           "--labels", f"recserve-host={host}", "--temp-dir", str(tmp / host), "--disable-usage-stats"]
    cmd += (["--head", "--port", str(GCS_PORT), "--include-dashboard", "false"] if head
            else ["--address", f"{fabric.address('h0')}:{GCS_PORT}"])
    run = subprocess.run(fabric.exec(host, cmd), capture_output=True, text=True, timeout=300, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"ray start on {host} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")


def ns_cpu_s(fabric: Fabric, exclude: set[int]) -> float:
    """CPU seconds used so far by the processes of the fabric's namespaces (not ``exclude``)."""
    import psutil

    from netns import netns_pids

    total = 0.0
    for host in fabric.hosts:
        for pid in netns_pids(fabric.ns(host)):
            if pid in exclude:
                continue
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


def load(fabric: Fabric, args: argparse.Namespace, target: str, mode: str, *, rate: float = 0.0) -> dict:
    """One load run from h0 (``load`` below, a process in h0's namespace): its summary with the
    CPU of the stack and the bytes between hosts during the run."""
    out = args.out / f"load-{time.monotonic_ns()}.json"
    cmd = fabric.exec("h0", [sys.executable, __file__, "load", "--target", target,
                             "--package", str(args.package), "--mode", mode, "--rate", str(rate),
                             "--concurrency", str(args.concurrency), "--seconds", str(args.seconds),
                             "--max-requests", str(args.max_requests), "--out", str(out)])
    client = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = client.stdout.readline()  # the client says when its trace is made and it is warm
    cpu0, _ = ns_cpu_s(fabric, {client.pid}), fabric.counters()
    rest = client.communicate(timeout=args.seconds + 300)[0]
    cpu1, net = ns_cpu_s(fabric, {client.pid}), fabric.counters()
    if client.returncode != 0 or not ready.startswith("warm"):
        raise RuntimeError(f"load client failed ({client.returncode}):\n{ready}{rest[-3000:]}")
    summary = json.loads(out.read_text())
    out.unlink()
    seconds = summary.pop("window_s")
    between = sum(net["bytes"].values())
    background = args.idle_bytes_per_s * seconds
    summary.update(cpu_s=cpu1 - cpu0, cpu_ms_per_req=(cpu1 - cpu0) / max(summary["ok"], 1) * 1e3,
                   host_bytes=between, host_bytes_per_req=max(between - background, 0) / max(summary["ok"], 1),
                   host_bytes_by_direction=net["bytes"], line_held_us_p50=net["held_us_p50"],
                   line_held_us_p99=net["held_us_p99"], line_dropped=net["dropped"])
    return summary


def phase(fabric: Fabric, args: argparse.Namespace, name: str, target: str, delay_ms: float,
          rows: list[dict]) -> None:
    """Open loop at args.rate then closed loop against ``target``, at one delay; rows appended
    and printed."""
    fabric.set_delay(delay_ms)
    if args.rate <= 0:  # the first phase sets the rate every phase offers
        closed = load(fabric, args, target, "closed")
        args.rate = round(0.4 * closed["throughput_rps"], 1)
        print(f"offered rate for every phase: {args.rate} req/s (40% of {name}'s closed loop)", flush=True)
        opened = load(fabric, args, target, "open", rate=args.rate)
    else:
        opened = load(fabric, args, target, "open", rate=args.rate)
        closed = load(fabric, args, target, "closed")
    for row in (opened, closed):
        row.update(config=name, one_way_delay_ms=delay_ms, load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()))
        rows.append(row)
        print(format_row(row), flush=True)


HEADER = ("| config | one-way delay ms | mode | offered req/s | ok | P50 ms | P99 ms | req/s | examples/s | "
          "CPU ms/req | bytes/req between hosts | line hold P50/P99 us | load avg |")


def format_row(r: dict) -> str:
    offered = f"{r['offered_rps']:.1f}" if r["mode"] == "open" else f"{r['concurrency']} clients"
    return (f"| {r['config']} | {r['one_way_delay_ms']:g} | {r['mode']} | {offered} | {r['ok']}/{r['sent']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_rps']:.1f} | {r['examples_per_s']:,.0f} | "
            f"{r['cpu_ms_per_req']:.1f} | {r['host_bytes_per_req']:,.0f} | "
            f"{r['line_held_us_p50']:.0f}/{r['line_held_us_p99']:.0f} | {r['load_average']} |")


def wait_monolith(log: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if "listening on" in log.read_text():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"monolith exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"monolith not listening after {timeout_s} s")


def idle_rate(fabric: Fabric, seconds: float) -> float:
    """Bytes per second the idle stack sends between hosts (heartbeats, metrics)."""
    fabric.counters()
    time.sleep(seconds)
    return sum(fabric.counters()["bytes"].values()) / seconds


def run(args: argparse.Namespace) -> int:
    from recserve.package import ModelPackage

    manifest = ModelPackage.open(args.package).manifest
    memory = 4 * sum(sh.bytes for sh in manifest.plan.shards)  # every shard fits a shard host
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"/tmp/rsvnet-{os.getpid()}")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows: list[dict] = []
    started, load_before = time.perf_counter(), os.getloadavg()
    delays = [float(d) for d in args.delays.split(",")]
    args.idle_bytes_per_s = 0.0
    with Fabric(["h0", "h1"]) as fabric:
        print(f"namespaces {', '.join(fabric.ns(h) for h in fabric.hosts)}; calibration (TCP 1-byte round trips "
              f"h0 -> h1 through the line):", flush=True)
        calibration = calibrate(fabric, delays)
        for line in calibration:
            print(f"  {line}", flush=True)
        serve = None
        ingress = f"{fabric.address('h0')}:{GRPC_PORT}"  # Serve's gRPC proxy on the head
        try:
            # 1. sharded, 1 node
            ray_start(fabric, "h0", tmp, memory=memory, head=True)
            serve = ServeProcess(args.package, f"{fabric.address('h0')}:{GCS_PORT}", GRPC_PORT,
                                 args.out / "serve-1node.log", prefix=tuple(fabric.exec("h0", [])))
            serve.wait_serving(args.serve_timeout)
            print(f"1-node stack serving after {time.perf_counter() - started:.0f} s", flush=True)
            phase(fabric, args, "sharded, 1 node", ingress, 0.0, rows)
            serve.stop()
            serve = None
            stop_processes(fabric.ns("h0"))
            # 2. the monolith
            log = args.out / "serve-monolith.log"
            with open(log, "w") as f:
                mono = subprocess.Popen(fabric.exec("h0", [sys.executable, "-m", "recserve.cli", "serve",
                                                           str(args.package), "--monolith", "--port", str(GRPC_PORT),
                                                           "--feature-filter", "none"]),
                                        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)
                try:
                    wait_monolith(log, mono, args.serve_timeout)
                    phase(fabric, args, "monolith", f"127.0.0.1:{GRPC_PORT}", 0.0, rows)
                finally:
                    mono.send_signal(signal.SIGINT)
                    try:
                        mono.wait(30)
                    except subprocess.TimeoutExpired:
                        mono.kill()
            stop_processes(fabric.ns("h0"))
            # 3. sharded, 2 nodes: every shard on h1, router and tower on h0
            ray_start(fabric, "h0", tmp, memory=1, head=True)
            ray_start(fabric, "h1", tmp, memory=memory, head=False)
            serve = ServeProcess(args.package, f"{fabric.address('h0')}:{GCS_PORT}", GRPC_PORT,
                                 args.out / "serve-2node.log", prefix=tuple(fabric.exec("h0", [])))
            serve.wait_serving(args.serve_timeout)
            print(f"2-node stack serving after {time.perf_counter() - started:.0f} s", flush=True)
            args.idle_bytes_per_s = idle_rate(fabric, 10.0)
            print(f"idle stack between hosts: {args.idle_bytes_per_s:,.0f} bytes/s", flush=True)
            for delay in delays:
                phase(fabric, args, "sharded, 2 nodes", ingress, delay, rows)
        finally:
            if serve is not None:
                serve.stop()
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    load_after = os.getloadavg()
    header = (f"load average before: {' '.join(f'{x:.1f}' for x in load_before)}; after: "
              f"{' '.join(f'{x:.1f}' for x in load_after)} (2 cores, shared with other sessions); "
              f"{time.perf_counter() - started:.0f} s")
    table = "\n".join([HEADER, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
                       *map(format_row, rows)])
    text = "\n".join([table, "", "Delay line calibration (TCP 1-byte round trips h0 -> h1):", "",
                      *[f"- {c}" for c in calibration], "", f"Idle stack between hosts: "
                      f"{args.idle_bytes_per_s:,.0f} bytes/s (subtracted from bytes/req).", "", header])
    print(text)
    (args.out / "network.md").write_text(text + "\n")
    (args.out / "network.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "calibration": calibration, "load": header,
                                                       "rows": rows}, indent=1) + "\n")
    return 0


ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 21500)); s.listen(1); s.settimeout(60)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.settimeout(60)
while (d := c.recv(1 << 20)):
    if d[-1:] != b"B": c.sendall(d[-1:])
"""
PING = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 21500), timeout=30); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in sys.argv[2:]:
    sys.stdin.readline()
    rtt = []
    for _ in range(300):
        t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtt.append(time.perf_counter() - t)
    rtt.sort()
    t = time.perf_counter(); n = 0
    while n < 512 << 20 and time.perf_counter() - t < 3:
        c.sendall(b"B" * (1 << 20)); n += 1 << 20
    c.sendall(b"x"); c.recv(1)
    print(f"{rtt[150] * 1e3:.3f} {rtt[297] * 1e3:.3f} {n * 8 / (time.perf_counter() - t) / 1e9:.2f}", flush=True)
"""


def calibrate(fabric: Fabric, delays: list[float]) -> list[str]:
    """Round trips through the line at each delay (300 x 1 byte, TCP), and a bulk transfer's
    rate (at most 512 MiB or 3 s), between h0 and h1."""
    echo = subprocess.Popen(fabric.exec("h1", [sys.executable, "-c", ECHO, fabric.address("h1")]))
    try:
        time.sleep(1.0)
        ping = subprocess.Popen(fabric.exec("h0", [sys.executable, "-c", PING, fabric.address("h1"),
                                                   *map(str, delays)]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        lines = []
        for delay in delays:
            fabric.set_delay(delay)
            ping.stdin.write("\n")
            ping.stdin.flush()
            p50, p99, gbit = ping.stdout.readline().split()
            lines.append(f"one-way {delay:g} ms: round trip P50 {p50} ms, P99 {p99} ms (nominal {2 * delay:g}); "
                         f"bulk {gbit} Gbit/s")
        ping.wait(30)
        return lines
    finally:
        echo.kill()
        echo.wait()


# ---- the load client (runs in h0's namespace) ----------------------------------------------------

def run_load(args: argparse.Namespace) -> int:
    import asyncio

    from loadtest.driver import closed_loop, open_loop, warm_up
    from loadtest.stats import summarize
    from loadtest.trace import cap_rows_to_served, make_trace
    from recserve.package import ModelPackage
    from serving.api.client import RankingClient

    manifest = ModelPackage.open(args.package).manifest
    with RankingClient(args.target) as client:
        client.wait_until_serving(manifest.name, manifest.version, timeout=120)
        workload = cap_rows_to_served(manifest.workload, client.model_info())
    trace = make_trace(workload, 64, seed=0)
    codes = asyncio.run(warm_up(args.target, trace.payloads, 16, timeout_s=30))
    if codes.count("OK") < 8:
        print(f"not serving: warm-up codes {codes}", flush=True)
        return 1
    print("warm", flush=True)
    if args.mode == "open":
        rec = asyncio.run(open_loop(args.target, trace.payloads, rate=args.rate, duration_s=args.seconds,
                                    max_requests=args.max_requests, timeout_s=5.0, seed=0))
    else:
        rec = asyncio.run(closed_loop(args.target, trace.payloads, concurrency=args.concurrency,
                                      duration_s=args.seconds, max_requests=args.max_requests, timeout_s=5.0))
    row = summarize(args.mode, rec, examples=trace.batch_sizes).as_dict()
    row["window_s"] = rec.wall_s
    args.out.write_text(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/network.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="every phase; tables to --out")
    r.add_argument("--package", type=Path, required=True)
    r.add_argument("--delays", default="0,0.1,0.5,2", help="one-way delays, ms (default 0,0.1,0.5,2)")
    r.add_argument("--rate", type=float, default=0.0, help="offered req/s of every open loop (0: 40%% of the "
                                                           "1-node closed loop's)")
    r.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default 4)")
    r.add_argument("--seconds", type=float, default=20.0, help="each load run's length (default 20)")
    r.add_argument("--max-requests", type=int, default=20_000, help="each load run's most requests")
    r.add_argument("--serve-timeout", type=float, default=400.0)
    r.add_argument("--out", type=Path, required=True)
    ld = sub.add_parser("load", help="(internal) one load run from inside a namespace")
    ld.add_argument("--target", required=True)
    ld.add_argument("--package", type=Path, required=True)
    ld.add_argument("--mode", choices=("open", "closed"), required=True)
    ld.add_argument("--rate", type=float, default=0.0)
    ld.add_argument("--concurrency", type=int, default=4)
    ld.add_argument("--seconds", type=float, default=20.0)
    ld.add_argument("--max-requests", type=int, default=20_000)
    ld.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "load":
        return run_load(args)
    if os.geteuid() != 0:
        print("benchmarks/network.py run: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
