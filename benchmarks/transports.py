"""Serve's two handle transports between router, shards and tower, measured end to end.

    .venv/bin/python benchmarks/transports.py [--requests 200] [--concurrency 8]

The monolith (whole model in one process, no Ray; serving/standalone/monolith.py) runs the same trace
first, as the baseline. For each workload (tiny; criteo-kaggle with tables capped at 100k rows = the default model)
and each transport ("reference": Ray actor calls through the object store, shard results
passed to the tower as DeploymentResponses; "grpc": handle.options(_by_reference=False)),
deploys the app on a local Ray, warms it up, then sends the same trace of requests over
gRPC: one at a time (latency p50/p99) and from N threads (throughput). Prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_package(tmp: Path) -> Path:
    import torch

    from recserve.export import export_package
    from recserve.model import build_model
    from recserve.planning import plan_workload
    from recserve.workloads import load_workload

    w = load_workload("tiny")
    torch.manual_seed(0)
    state = tmp / "tiny.pt"
    torch.save(build_model(w).state_dict(), state)
    plan = plan_workload(w, strategy="load", num_shards=2)
    return export_package(w, state, tmp / "tiny-load-2", plan=plan, progress=False).path


def measure(client, batches, *, concurrency: int) -> dict[str, float]:
    from serving.api.codec import encode_request

    requests = [encode_request(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()}) for b in batches]
    for r in requests[:20]:  # warm-up
        client.predict_raw(r, timeout=60)
    lat = []
    for r in requests:
        t = time.perf_counter()
        client.predict_raw(r, timeout=60)
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda r: client.predict_raw(r, timeout=60), requests * 2))
    seconds = time.perf_counter() - t
    lat.sort()
    examples = sum(b.batch_size for b in batches) * 2
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "rps": 2 * len(requests) / seconds,
        "examples_per_s": examples / seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workloads", default="tiny,criteo-kaggle")
    args = ap.parse_args()

    import ray
    from ray import serve

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.app.builder import build_app
    from serving.api.client import RankingClient
    from serving.api.wire import GRPC_SERVICERS
    from serving.config import AppArgs
    from recserve.default_package import build_default_package
    from serving.standalone.monolith import MonolithThread

    tmp = Path(tempfile.mkdtemp(prefix="recserve-bench-"))
    packages = {}
    for name in args.workloads.split(","):
        packages[name] = tiny_package(tmp) if name == "tiny" else build_default_package()

    rows = []
    traces = {}
    for name, pkg in packages.items():  # the baseline: the whole model in one process, no Ray
        manifest = ModelPackage.open(pkg).manifest
        batch_size = 64 if name == "tiny" else 256
        gen = TrafficGenerator(manifest.workload, seed=0)
        traces[name] = (batch_size, [gen.batch(batch_size) for _ in range(args.requests)])
        with MonolithThread(pkg) as srv, RankingClient(f"127.0.0.1:{srv.port}") as client:
            r = measure(client, traces[name][1], concurrency=args.concurrency)
        rows.append((name, manifest.plan.num_shards, batch_size, "monolith", r))

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS})
    try:
        for name, pkg in packages.items():
            manifest = ModelPackage.open(pkg).manifest
            batch_size, batches = traces[name]
            for transport in ("reference", "grpc"):
                app = f"bench-{name}-{transport}"
                print(f"deploying {app} ({manifest.plan.num_shards} shards) ...", flush=True)
                serve.run(build_app(AppArgs(package=str(pkg), transport=transport)), name=app, route_prefix=f"/{app}")
                with RankingClient(f"127.0.0.1:{port}", application=app) as client:
                    client.wait_until_serving(manifest.name, manifest.version)
                    r = measure(client, batches, concurrency=args.concurrency)
                rows.append((name, manifest.plan.num_shards, batch_size, transport, r))
                serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"\nhost {platform.node()} ({os.cpu_count()} CPUs), commit {commit}, {args.requests} requests, "
          f"throughput with {args.concurrency} client threads")
    print(f"{'workload':<14} {'shards':>6} {'B':>5} {'transport':<10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'examples/s':>11}")
    for name, n, b, transport, r in rows:
        print(f"{name:<14} {n:>6} {b:>5} {transport:<10} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['rps']:>8.1f} {r['examples_per_s']:>11.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
