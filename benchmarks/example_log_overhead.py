"""What the served-example log costs a request: P50/P99 latency of the monolith (real gRPC on
127.0.0.1, the tiny model) at log rates 0 (off), 0.01, 0.1 and 1.0.

One server per rate, all running at once; requests go round-robin over the servers (the same
request to each in turn), so a busy machine slows every rate alike.

    .venv/bin/python benchmarks/example_log_overhead.py --out benchmarks/results/example_log
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recserve.synth import TrafficGenerator  # noqa: E402
from recserve.workloads import load_workload  # noqa: E402

RATES = (0.0, 0.01, 0.1, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "example_log")
    p.add_argument("--requests", type=int, default=2000, help="requests per rate")
    p.add_argument("--batch", type=int, default=64, help="examples per request")
    p.add_argument("--warmup", type=int, default=100)
    args = p.parse_args()

    from recserve.export import export_package
    from recserve.planning import plan_workload
    from recserve.train import train
    from serving.api.client import RankingClient
    from serving.example_log import ExampleLog, ExampleLogConfig
    from serving.standalone.monolith import MonolithThread

    tiny = load_workload("tiny")
    work = Path(tempfile.mkdtemp(prefix="recserve-logbench-"))
    train(tiny, work / "m.pt", steps=20, progress=False)
    pkg = export_package(tiny, work / "m.pt", work / "pkg", plan=plan_workload(tiny, strategy="table", num_shards=2),
                         progress=False).path
    logs = {r: ExampleLog(ExampleLogConfig(rate=r, log_dir=str(work / f"log-{r}"), flush_s=1.0), model="tiny",
                          version="v", features=tiny.features) if r > 0 else None for r in RATES}
    servers = {r: MonolithThread(pkg, example_log=logs[r]).start() for r in RATES}
    clients = {r: RankingClient(f"127.0.0.1:{s.port}") for r, s in servers.items()}
    gen = TrafficGenerator(tiny, seed=0)
    trace = [gen.batch(args.batch) for _ in range(64)]
    sparse = [{f: (b.sparse[f].values, b.sparse[f].lengths) for f in tiny.features} for b in trace]
    ms = {r: [] for r in RATES}
    started = time.perf_counter()
    for i in range(args.warmup + args.requests):
        b, s = trace[i % len(trace)], sparse[i % len(trace)]
        for r in (RATES if i % 2 == 0 else RATES[::-1]):  # alternate the order too
            t0 = time.perf_counter()
            clients[r].predict(b.dense, s, request_id=f"req-{i}", timeout=30)
            if i >= args.warmup:
                ms[r].append((time.perf_counter() - t0) * 1000)
    seconds = time.perf_counter() - started
    stats = {}
    for r in RATES:
        clients[r].close()
        servers[r].stop()
        if logs[r] is not None:
            logs[r].close()
            stats[r] = logs[r].stats()
    base50, base99 = np.percentile(ms[0.0], [50, 99])
    lines = ["| log rate | P50 ms | P99 ms | P50 vs off | P99 vs off | examples logged | dropped | bytes written |",
             "|---|---|---|---|---|---|---|---|"]
    for r in RATES:
        p50, p99 = np.percentile(ms[r], [50, 99])
        st = stats.get(r, {})
        lines.append(f"| {r:g}{' (off)' if r == 0 else ''} | {p50:.3f} | {p99:.3f} | {p50 - base50:+.3f} | "
                     f"{p99 - base99:+.3f} | {st.get('examples_logged', 0):,} | {st.get('examples_dropped', 0):,} | "
                     f"{st.get('bytes_written', 0):,} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else []
    lines.append(f"\nmonolith (plain grpc.aio, no Ray), tiny model (2 shards in-process), {args.batch} examples per "
                 f"request, {args.requests} requests per rate, sequential, interleaved across the four servers; "
                 f"{platform.processor() or platform.machine()}, load average at the end {' '.join(load)}; "
                 f"commit {commit}.")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "run.json").write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                       seconds=seconds, commit=commit, load=load,
                                                       latency_ms={str(r): v for r, v in ms.items()},
                                                       log_stats={str(r): v for r, v in stats.items()}), indent=1))
    print(text)


if __name__ == "__main__":
    main()
