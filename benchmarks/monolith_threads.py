"""The monolith's CPU per request against torch's intra-op threads (issue 19: 13.9 vs 37.9
ms per request in two runs of the same bench).

The same seeded criteo-kaggle trace is replayed at the monolith (``recserve serve
--monolith``, no feature filter) started under each thread setting in turn, in rounds
(setting A, B, ..., then again), so load from other processes on a shared machine hits
every setting alike. A setting is the server's ``--torch-threads`` (AppArgs.torch_threads)
and environment: ``default`` (torch's choice, one thread per core), ``threads1`` (as a Ray
replica runs), ``threads2``, ``threads2-passive`` (OMP_WAIT_POLICY=PASSIVE: idle threads sleep
instead of spinning). Per run: open-loop rates and one closed loop, the
server's CPU ms per request (psutil over its process tree), the load average.

    .venv/bin/python benchmarks/monolith_threads.py --package PKG [--settings threads1,threads2]
        [--rounds 2] [--rates 10,30] [--duration 12] [--out DIR]

PKG: e.g. the bench's load-2 package (``recserve bench --workload criteo-kaggle --max-rows
100000 --configs load-2`` writes it under artifacts/bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from loadtest.bench import BenchOptions, measure
from loadtest.targets import MonolithServer
from loadtest.trace import make_trace
from recserve.workloads import load_workload

# name -> (environment, `recserve serve` arguments) of the monolith
SETTINGS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "default": ({}, ()),  # torch's own choice: one intra-op thread per core
    "threads1": ({}, ("--torch-threads", "1")),  # as a Ray replica runs (Ray's OMP_NUM_THREADS=1)
    "threads2": ({}, ("--torch-threads", "2")),
    "threads2-passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ("--torch-threads", "2")),  # no spinning for work
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--workload", default="criteo-kaggle")
    p.add_argument("--max-rows", type=int, default=100_000)
    p.add_argument("--settings", default="threads1,threads2", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rates", default="10,30")
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--closed-concurrency", type=int, default=8)
    p.add_argument("--trace-size", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/monolith-threads"))
    args = p.parse_args()
    settings = args.settings.split(",")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"--settings: unknown {s!r} (known: {', '.join(SETTINGS)})")
    opts = BenchOptions(workload=args.workload, max_rows=args.max_rows, configs=("monolith",),
                        rates=tuple(float(r) for r in args.rates.split(",")), duration_s=args.duration,
                        closed_concurrency=args.closed_concurrency, trace_size=args.trace_size)
    workload = load_workload(args.workload).with_max_rows(args.max_rows)
    trace = make_trace(workload, args.trace_size, seed=0)
    print(f"trace: {args.trace_size} requests, {trace.batch_sizes.mean():.0f} examples/request on average", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rnd in range(args.rounds):
        for s in settings:
            env, serve_args = SETTINGS[s]
            print(f"[round {rnd + 1}] {s}: env {env} args {' '.join(serve_args)}", flush=True)
            with MonolithServer(args.package, log_dir=args.out / "logs", env=env, extra_args=serve_args,
                                name=s) as target:
                for row in measure(s, target, trace, opts, plan=None):
                    rows.append({"round": rnd + 1, "setting": s, "mode": row.mode, "offered": row.offered_rps if row.mode == "open" else None,
                                 "ok_per_s": row.throughput_rps, "p50_ms": row.p50_ms, "p99_ms": row.p99_ms,
                                 "cpu_ms_per_req": row.cpu_ms_per_req, "load_1m": row.loadavg_1m,
                                 "errors": row.errors})
            time.sleep(1)
    lines = ["| setting | round | mode | offered | ok/s | p50 ms | p99 ms | CPU ms/req | load 1m |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mode"], r["offered"] or 0, r["setting"], r["round"])):
        lines.append(f"| {r['setting']} | {r['round']} | {r['mode']} | {r['offered'] or '-'} | {r['ok_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['cpu_ms_per_req']:.2f} | {r['load_1m']:.1f} |")
    table = "\n".join(lines)
    print(table, flush=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "rows.json").write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                                                    "args": {k: str(v) for k, v in vars(args).items()},
                                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
