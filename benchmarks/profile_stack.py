"""Where the sharded stack spends its time: py-spy profiles of the Serve processes under load.

Starts ``recserve serve PACKAGE`` (or reuses --address), replays a trace open-loop at
--rate for --duration seconds, and meanwhile records each serving process (proxy, router,
shards, dense tower) with ``py-spy record --format raw`` (collapsed stacks, idle threads
left out). Prints, per process, CPU busy share and the heaviest frames grouped into
buckets (gRPC proxy, Serve routing/handles, serialization, batching waits, model compute,
asyncio scheduling), and keeps the raw stacks under --out for flame graphs.

    .venv/bin/python benchmarks/profile_stack.py artifacts/bench/criteo-kaggle-rows100000-fp32/packages/table-2 \\
        --workload criteo-kaggle --max-rows 100000 --rate 40 --duration 20 --out benchmarks/results/profile

Traffic only to 127.0.0.1. Needs py-spy (in .venv) and permission to ptrace (root here).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

# bucket -> regex over a whole collapsed stack (first match wins, checked in this order)
BUCKETS = (
    ("model compute (torch/fbgemm)", r"torch|fbgemm|embedding_bag|_call_impl|forward \(|\bmm\b|linear"),
    ("serialization (pickle/protobuf/numpy copy)", r"pickle|serializ|deserializ|SerializeToString|FromString|ParseFromString|_pb2|codec\.py|cloudpickle|msgpack"),
    ("serve batching (@serve.batch queue)", r"batching\.py|_BatchQueue|wait_for_batch"),
    ("serve handles/router (replica scheduling)", r"router\.py|request_router|pow_2|replica_scheduler|handle\.py|_private/replica\.py|replica_result|choose_replica"),
    ("gRPC proxy / server", r"proxy\.py|grpc|_server\.py|cygrpc"),
    ("ray core (object store, actor calls)", r"ray/_private/worker|_raylet|object_ref|ray/actor\.py|core_worker|serialization\.py"),
    ("asyncio event loop", r"asyncio|uvloop|selectors|base_events"),
)


def classify(stack: str) -> str:
    for name, pattern in BUCKETS:
        if re.search(pattern, stack):
            return name
    return "other"


def summarize_raw(path: Path, top: int = 12) -> tuple[int, collections.Counter, collections.Counter]:
    """(samples, samples by bucket, samples by leaf-most project/serve frame) of a raw py-spy file."""
    buckets: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        buckets[classify(stack)] += n
        frames = stack.split(";")
        leaves[frames[-1][:140]] += n
    return total, buckets, leaves


def main(argv: list[str] | None = None) -> int:
    from loadtest.cpu import describe, ray_serve_processes
    from loadtest.driver import open_loop, warm_up
    from loadtest.targets import ServeStack
    from loadtest.trace import make_trace
    from recserve.workloads import load_workload

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", type=Path)
    p.add_argument("--workload", default="criteo-kaggle")
    p.add_argument("--max-rows", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=40.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rate-hz", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    p.add_argument("--serve-env", action="append", default=[], help="KEY=VALUE for the stack")
    p.add_argument("--transport", choices=("reference", "grpc"), default=None, help="`recserve serve --transport`")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `recserve serve` (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device of shards and tower (cpu, cuda)")
    args = p.parse_args(argv)
    if args.duration > 120:
        p.error("--duration: at most 120 s")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    workload = load_workload(args.workload).with_max_rows(args.max_rows or None)
    trace = make_trace(workload, 500, seed=0)
    env = dict(kv.split("=", 1) for kv in args.serve_env)
    extra = (("--transport", args.transport) if args.transport else ()) + tuple(args.serve_arg)
    with ServeStack(args.package, name="profile", log_dir=args.out, env=env, extra_args=extra,
                    device=args.device) as stack:
        asyncio.run(warm_up(stack.address, trace.payloads, 30))
        procs = ray_serve_processes(within=stack.proc.pid)
        # idle burn: what the serving processes use with no traffic at all
        time.sleep(2.0)
        before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
        time.sleep(5.0)
        idle = {p.pid: (sum(p.cpu_times()[:2]) - before[p.pid]) / 5.0 for p in procs}
        print("idle CPU (no traffic), % of one core: " + ", ".join(
            f"{describe([p])[0].split(':')[-1].strip() or p.pid} {idle[p.pid]:.0%}" for p in procs))
        print("profiling: " + "; ".join(describe(procs)), flush=True)
        spies = []
        for proc in procs:
            title = describe([proc])[0].split(" ", 1)[1].strip()
            name = re.sub(r"[^A-Za-z0-9_-]+", "_", title.split(":")[-1] or title)[:40]
            raw = args.out / f"{proc.pid}-{name}.txt"
            cmd = [py_spy, "record", "-p", str(proc.pid), "-d", str(int(args.duration)), "-r", str(args.rate_hz),
                   "--format", "raw", "-o", str(raw), "--nonblocking"]
            spies.append((title, raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        time.sleep(1.0)
        run = asyncio.run(open_loop(stack.address, trace.payloads, rate=args.rate, duration_s=args.duration - 2))
        for _, _, sp in spies:
            sp.wait(timeout=args.duration + 60)
    ok = sum(c == "OK" for c in run.codes)
    lat = sorted(run.latency_s)
    print(f"\nload: {len(run)} sent at {args.rate:g}/s, {ok} OK, p50 {lat[len(lat) // 2] * 1e3:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99) - 1] * 1e3:.1f} ms")
    expected = args.rate_hz * args.duration
    for title, raw, sp in spies:
        if not raw.exists():
            print(f"\n{title}: no profile ({sp.stderr.read().decode()[-300:]})")
            continue
        total, buckets, leaves = summarize_raw(raw)
        print(f"\n== {title}: {total} busy samples of ~{expected:.0f} ({total / expected:.0%} of one core)")
        for name, n in buckets.most_common():
            print(f"   {n / max(total, 1):6.1%}  {name}")
        print("   heaviest leaf frames:")
        for frame, n in leaves.most_common(8):
            print(f"   {n / max(total, 1):6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
