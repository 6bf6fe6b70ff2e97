"""The data-plane options of the sharded stack, measured end to end over gRPC (issue 9 §2).

    .venv/bin/python benchmarks/dataplane.py [--workload dlrmv2 --max-rows 20000 | --package DIR]
        [--device cpu|cuda] [--shards 2] [--requests 120] [--concurrency 8]
        [--configs tower-grpc-float16,router-reference-float16,...] [--out DIR]

Each configuration is ``<fanout>-<transport>-<wire dtype>[-r<router replicas>]``:
    fanout     tower  = the router sends the split ids to the dense tower, which calls the shards
               router = the router calls the shards and hands their responses to the tower by
                        reference (through the node's shared-memory object store)
    transport  grpc | reference: Serve's handle transport between deployments
    wire       float32 | float16: the pooled embeddings between shards and tower
The monolith (the same cores in one process behind grpc.aio) runs the same trace first. For each
configuration: latency one request at a time (p50/p99), then throughput from ``--concurrency``
client threads, with the CPU time every Serve process spent per request (psutil over the
process titles Ray sets: proxy, Router, shard-K, DenseTower). Prints a table, writes it with
the raw rows (JSON) to --out.
"""

from __future__ import annotations

import argparse
import json
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

DEFAULT_CONFIGS = ("router-grpc-float32", "tower-grpc-float32", "tower-grpc-float16",
                   "tower-reference-float16", "router-reference-float32", "router-reference-float16")
ROLES = (("proxy", "ProxyActor"), ("router", ":Router"), ("shards", ":shard-"), ("tower", ":DenseTower"))  # Ray 2.60 titles


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_config(name: str) -> dict:
    parts = name.split("-")
    if len(parts) not in (3, 4) or parts[0] not in ("tower", "router") or parts[1] not in ("grpc", "reference") \
            or parts[2] not in ("float32", "float16") or (len(parts) == 4 and not parts[3].startswith("r")):
        raise SystemExit(f"--configs: {name!r} is not <tower|router>-<grpc|reference>-<float32|float16>[-rN]")
    args = {"fanout": parts[0], "transport": parts[1], "wire_dtype": parts[2]}
    if len(parts) == 4:
        args["router_replicas"] = int(parts[3][1:])
    return args


def role_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) so far of the Serve processes of each role."""
    from loadtest.cpu import processes_titled

    out = {}
    for role, title in ROLES:
        total = 0.0
        for p in processes_titled([title], within=os.getpid()):  # this Ray only
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001  a process that ended meanwhile
                pass
        out[role] = total
    return out


def measure(client, requests, examples: int, *, concurrency: int, cpu: bool) -> dict[str, float]:
    for r in requests[:10]:  # warm-up
        client.predict_raw(r, timeout=120)
    lat = []
    for r in requests[: max(20, len(requests) // 2)]:
        t = time.perf_counter()
        client.predict_raw(r, timeout=120)
        lat.append((time.perf_counter() - t) * 1000)
    before = role_cpu_s() if cpu else {}
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda r: client.predict_raw(r, timeout=120), requests * 2))
    seconds = time.perf_counter() - t
    after = role_cpu_s() if cpu else {}
    lat.sort()
    n = 2 * len(requests)
    row = {"p50_ms": statistics.median(lat), "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
           "rps": n / seconds, "examples_per_s": 2 * examples / seconds}
    for role in after:
        row[f"cpu_ms_per_req_{role}"] = (after[role] - before[role]) * 1000 / n
    return row


def build_package(args, tmp: Path) -> Path:
    if args.package:
        return Path(args.package)
    from recserve.planning import plan_workload
    from recserve.random_init import export_random_package
    from recserve.workloads import load_workload

    w = load_workload(args.workload).with_max_rows(args.max_rows)
    plan = plan_workload(w, strategy="load", num_shards=args.shards, dtype=args.dtype)
    return export_random_package(w, tmp / "package", plan=plan, seed=0, progress=False).path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="dlrmv2")
    ap.add_argument("--max-rows", type=int, default=20_000, help="cap on every table's rows (default 20000)")
    ap.add_argument("--dtype", default="fp32", help="table storage dtype of the built package")
    ap.add_argument("--package", default=None, help="serve this package instead of building one")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--out", default=None, help="directory for dataplane.txt and dataplane.json")
    args = ap.parse_args()
    configs = [(c, parse_config(c)) for c in args.configs.split(",")]

    import ray
    from ray import serve

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.app.builder import build_app
    from serving.api.client import RankingClient
    from serving.api.codec import encode_request
    from serving.api.wire import GRPC_SERVICERS
    from serving.config import AppArgs
    from serving.standalone.monolith import MonolithThread

    tmp = Path(tempfile.mkdtemp(prefix="recserve-dataplane-"))
    package = build_package(args, tmp)
    manifest = ModelPackage.open(package).manifest
    gen = TrafficGenerator(manifest.workload, seed=0)
    batches = [gen.batch() for _ in range(args.requests)]  # the workload's request sizes
    examples = sum(b.batch_size for b in batches)
    requests = [encode_request(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()}) for b in batches]
    print(f"{manifest.name}: {manifest.plan.num_shards} shards, {len(requests)} requests of "
          f"{examples / len(requests):.0f} examples on average", flush=True)

    rows = []
    # admission control off: this measures capacity (closed loop), not shedding
    with MonolithThread(package, device=args.device, max_latency_factor=None, max_in_flight=1024) as srv, RankingClient(f"127.0.0.1:{srv.port}") as client:
        rows.append(("monolith", measure(client, requests, examples, concurrency=args.concurrency, cpu=False)))
    print("monolith done", flush=True)

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS},
                logging_config={"enable_access_log": False})
    try:
        for name, app_args in configs:
            app = f"dp-{name}"
            print(f"deploying {app} ...", flush=True)
            serve.run(build_app(AppArgs(package=str(package), device=args.device, **app_args)), name=app,
                      route_prefix=f"/{app}")
            with RankingClient(f"127.0.0.1:{port}", application=app) as client:
                client.wait_until_serving(manifest.name, manifest.version)
                rows.append((name, measure(client, requests, examples, concurrency=args.concurrency, cpu=True)))
            serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines = [f"host {platform.node()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), device {args.device}, "
             f"commit {commit}, {manifest.name} {manifest.plan.num_shards} shards, {len(requests)} requests "
             f"(mean B {examples / len(requests):.0f}), throughput with {args.concurrency} client threads",
             f"{'config':<28} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>7} {'examples/s':>10} "
             + " ".join(f"{'cpu ' + r:>11}" for r, _ in ROLES) + "   (CPU ms per request)"]
    for name, r in rows:
        cpu = " ".join(f"{r.get(f'cpu_ms_per_req_{role}', float('nan')):>11.1f}" for role, _ in ROLES)
        lines.append(f"{name:<28} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['rps']:>7.1f} "
                     f"{r['examples_per_s']:>10.0f} {cpu}")
    print("\n" + "\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dataplane.txt").write_text("\n".join(lines) + "\n")
        (out / "dataplane.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
