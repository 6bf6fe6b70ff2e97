"""Shards on several GPUs of one host (issue 14): placement and score check, and the scaling bench.

Three commands::

    # where every replica landed and sampled scores against the CPU reference (LocalRanker)
    python benchmarks/multigpu.py check --package PKG --gpus 2 --device cuda --out DIR
    # the same on a machine without GPUs: Ray is told of 2 GPUs it does not have
    python benchmarks/multigpu.py check --package PKG --gpus 2 --fake-gpus --device cpu --out DIR

    # dlrmv2 full size on 1, 2 and 4 GPUs (examples/s at P99 <= 60 ms), then the model larger
    # than one GPU (benchmarks/workloads/dlrmv2-2x.json) on 2 GPUs, served and score-checked
    python benchmarks/multigpu.py bench --gpus 1,2,4 --out benchmarks/results/multigpu

    # pooled embeddings cuda:0 -> cuda:1: peer copy vs through pinned host memory
    python benchmarks/multigpu.py transfer --out benchmarks/results/multigpu

``bench`` plans each GPU count with the GPU planner (sharding/gpus.py: shard count and per-shard
memory from --gpu-memory), runs ``recserve bench`` for that plan with ``recserve serve --gpus N``
(random weights: ``--init random``), and writes ``multigpu.md`` / ``multigpu.json`` in --out:
per GPU count the shards, the best examples/s of a run with P99 <= --p99-ms and no errors, and
its ratio to one GPU against the targets (2 GPUs >= 1.8x, 4 GPUs >= 3.4x).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LARGER = ROOT / "benchmarks" / "workloads" / "dlrmv2-2x.json"
TARGETS = {2: 1.8, 4: 3.4}  # examples/s at the P99 bound, x one GPU's
APP = "multigpu"


def spread_problems(placement: dict[str, list[dict]], *, gpus: int, shards_per_gpu: int) -> list[str]:
    """What is wrong with ``placement`` (serving.app.placement.replica_gpus) for ``gpus`` shard GPUs: a shard
    replica without exactly one GPU, a GPU holding more than ``shards_per_gpu`` shard replicas,
    or (with at least as many shard replicas as GPUs) a GPU holding none. [] when it is as designed."""
    problems, per_gpu = [], Counter()
    for name, replicas in placement.items():
        if not name.startswith("shard-") and name != "DenseTower":
            continue
        for r in replicas:
            if len(r["gpu_ids"]) != 1:
                problems.append(f"{name}: expected one GPU, got {r['gpu_ids']}")
            elif name.startswith("shard-"):
                per_gpu[r["gpu_ids"][0]] += 1
    crowded = {g: n for g, n in per_gpu.items() if n > shards_per_gpu}
    if crowded:
        problems.append(f"more than {shards_per_gpu} shard replica(s) on GPU(s) {crowded}")
    if sum(per_gpu.values()) >= gpus and len(per_gpu) < gpus:
        problems.append(f"shard replicas on {len(per_gpu)} of {gpus} GPU(s): {dict(per_gpu)}")
    return problems


def best_under_p99(rows: list[dict], p99_ms: float) -> dict | None:
    """The bench row with the most examples/s among those with P99 <= ``p99_ms`` and no errors."""
    ok = [r for r in rows if float(r["p99_ms"]) <= p99_ms and not r["errors"] and int(r["ok"]) > 0]
    return max(ok, key=lambda r: float(r["examples_per_s"]), default=None)


def scaling_table(results: list[dict], p99_ms: float) -> str:
    """Markdown: per GPU count, shards, examples/s at the P99 bound and x one GPU's vs the target."""
    base = next((r["examples_per_s"] for r in results if r["gpus"] == 1 and r["workload"] == "dlrmv2"), None)
    lines = [f"| workload | GPUs | shards | examples/s at P99 <= {p99_ms:g} ms | P99 ms | x 1 GPU | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        eps = r["examples_per_s"]
        ratio = eps / base if eps and base and r["workload"] == "dlrmv2" else math.nan
        target = TARGETS.get(r["gpus"]) if r["workload"] == "dlrmv2" else None
        verdict = "-" if target is None else f">= {target}x: {'met' if ratio >= target else 'missed'}"
        shown_eps = "none under the bound" if eps is None else f"{eps:,.0f}"
        shown_p99 = "-" if r["p99"] is None else f"{r['p99']:.1f}"
        shown_ratio = "-" if math.isnan(ratio) else f"{ratio:.2f}"
        if "check" in r:
            c = r["check"]
            verdict += (f"; {c['requests']} sampled requests vs the CPU reference: max |diff| "
                        f"{c['max_abs_diff']:.2g}{' PROBLEMS: ' + '; '.join(c['problems']) if c['problems'] else ''}")
        lines.append(f"| {r['workload']} | {r['gpus']} | {r['shards']} | {shown_eps} | {shown_p99} | "
                     f"{shown_ratio} | {verdict} |")
    return "\n".join(lines)


# ---- check: placement and scores of one package served over N GPUs -----------------------------

def _start_ray(*, num_cpus: int, num_gpus: int | None, attempts: int = 3) -> None:
    """A local Ray; started again when its raylet misses Ray's fixed 30 s to register (a loaded machine)."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
                     num_gpus=num_gpus, log_to_driver=False, configure_logging=False)
            return
        except Exception as e:  # ray raises a bare Exception for "timed out during startup"
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(e):
                raise
            print(f"ray start {attempt}/{attempts} failed ({e}); starting again", flush=True)


def run_check(args: argparse.Namespace) -> dict:
    """Serve ``args.package`` with gpus=N, record where each replica runs and the scores of
    ``args.requests`` sampled requests; stop; score the same requests with LocalRanker on the CPU."""
    import numpy as np
    import ray
    from ray import serve

    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.v1 import ranker_pb2
    from serving.app.builder import build_app
    from serving.api.client import RankingClient
    from serving.api.wire import GRPC_SERVICERS
    from serving.config import AppArgs
    from serving.engine.local_ranker import LocalRanker
    from serving.app.placement import gpu_placement, replica_gpus
    from serving.ops.ports import free_port

    manifest = ModelPackage.open(args.package).manifest
    trace = make_trace(manifest.workload, args.requests, seed=args.seed)  # the package's own (row-capped) tables
    placement_of = gpu_placement(shards=manifest.plan.num_shards, gpus=args.gpus, tower=args.tower_gpu)

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    _start_ray(num_cpus=args.num_cpus or os.cpu_count(), num_gpus=args.gpus if args.fake_gpus else None)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICERS})
        serve.run(build_app(AppArgs(package=str(args.package), gpus=args.gpus, device=args.device,
                                    tower_gpu=args.tower_gpu)), name=APP, route_prefix=f"/{APP}")
        with RankingClient(f"127.0.0.1:{port}", application=APP) as client:
            client.wait_until_serving(manifest.name, manifest.version, timeout=args.timeout)
            print(f"serving after {time.perf_counter() - started:.1f} s; {args.requests} request(s)", flush=True)
            served = [np.asarray(client.predict_raw(ranker_pb2.PredictRequest.FromString(p), timeout=args.timeout)
                                 .scores, np.float32) for p in trace.payloads]
        placement = replica_gpus(APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    reference = LocalRanker.load(args.package, device="cpu")
    diffs = [float(np.max(np.abs(s - reference.score(b)))) for s, b in zip(served, trace.batches)]
    shard_gpus = args.gpus - (1 if args.tower_gpu == "own" else 0)  # one tower replica
    problems = spread_problems(placement, gpus=shard_gpus, shards_per_gpu=placement_of.shards_per_gpu)
    worst = max(diffs, default=0.0)
    if worst > args.tolerance:
        problems.append(f"scores differ from the CPU reference by up to {worst:.3g} (> {args.tolerance})")
    return {"package": str(args.package), "gpus": args.gpus, "fake_gpus": args.fake_gpus, "device": args.device,
            "shards": manifest.plan.num_shards, "shards_per_gpu": placement_of.shards_per_gpu,
            "shard_num_gpus": placement_of.shard_gpus, "tower_num_gpus": placement_of.tower_gpus,
            "placement": placement, "requests": len(served), "examples": int(sum(len(s) for s in served)),
            "max_abs_diff": worst, "tolerance": args.tolerance, "problems": problems}


# ---- transfer: pooled embeddings GPU -> GPU, direct vs through pinned host memory ---------------

def run_transfer(args: argparse.Namespace) -> list[dict]:
    """Time moving a shard's pooled embeddings [B, F x D] (fp16) from cuda:0 to cuda:1 directly
    (peer copy over NVLink: the best a GPU-tensor transport such as NCCL can do) and through
    pinned host memory (what serving does: D2H into a pinned buffer, bytes between processes,
    H2D), per batch size; CUDA events, warm-up, median of ``args.iters``. Needs 2 GPUs."""
    import torch

    if torch.cuda.device_count() < 2:
        raise SystemExit("transfer: needs 2 GPUs (found %d)" % torch.cuda.device_count())
    src, dst = torch.device("cuda:0"), torch.device("cuda:1")
    rows = []
    for b in args.batch_sizes:
        pooled = torch.randn(b, args.width, device=src).to(torch.float16)  # [B, F x D]
        pinned = torch.empty(pooled.shape, dtype=pooled.dtype, pin_memory=True)
        landed = torch.empty(pooled.shape, dtype=pooled.dtype, device=dst)

        def direct() -> None:
            landed.copy_(pooled, non_blocking=True)

        def via_host() -> None:
            pinned.copy_(pooled, non_blocking=True)
            torch.cuda.synchronize(src)  # the shard hands numpy on only once the copy is done
            landed.copy_(pinned, non_blocking=True)

        for name, fn in (("direct (peer)", direct), ("pinned host", via_host)):
            times = []
            for i in range(args.iters + 3):
                torch.cuda.synchronize(src), torch.cuda.synchronize(dst)
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize(dst)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            assert torch.equal(landed.cpu(), pooled.cpu()), f"{name}: bytes changed on the way"
            ms = sorted(times)[len(times) // 2] * 1e3
            nbytes = pooled.numel() * pooled.element_size()
            rows.append({"batch": b, "path": name, "bytes": nbytes, "ms": ms, "GB_s": nbytes / ms / 1e6})
    print("| B | path | bytes | ms | GB/s |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['path']} | {r['bytes']:,} | {r['ms']:.3f} | {r['GB_s']:.1f} |")
    return rows


# ---- bench: dlrmv2 on 1/2/4 GPUs, and the model larger than one GPU -----------------------------

def _plan(workload: str, gpus: int, args: argparse.Namespace):
    from recserve.cli.plan import served_tower_bytes
    from recserve.planning import plan_workload_for_gpus
    from recserve.workloads import load_workload
    from sharding import GpuTopology

    w = load_workload(workload)
    topology = GpuTopology(gpus=gpus, gpu_memory=args.gpu_memory, tower_bytes=served_tower_bytes(w))
    plan = plan_workload_for_gpus(w, strategy=args.strategy, topology=topology, dtype=args.dtype)
    print(f"{w.name} on {gpus} GPU(s): {topology.describe(plan.num_shards)}", flush=True)
    return plan, topology.shard_memory(plan.num_shards)


def _bench_one(workload: str, gpus: int, args: argparse.Namespace) -> dict:
    import csv

    plan, shard_memory = _plan(workload, gpus, args)
    out = args.out / f"{Path(workload).stem}-gpus{gpus}"
    config = f"{args.strategy}-{plan.num_shards}"
    cmd = [sys.executable, "-m", "recserve.cli", "bench", "--workload", workload, "--max-rows", "0",
           "--init", "random", "--device", args.device, "--dtype", args.dtype, "--configs", config,
           "--shard-memory", str(shard_memory), "--rates", args.rates, "--duration", str(args.duration),
           "--closed-concurrency", str(args.closed_concurrency), "--artifacts", str(args.artifacts),
           "--out", str(out), f"--serve-arg=--gpus={gpus}", f"--serve-arg=--device={args.device}",
           *(["--discard-packages"] if args.discard_packages and Path(workload) != LARGER else [])]
    print("$ " + " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    best = best_under_p99(rows, args.p99_ms)
    return {"workload": Path(workload).stem, "gpus": gpus, "shards": plan.num_shards, "out": str(out),
            "examples_per_s": float(best["examples_per_s"]) if best else None,
            "p99": float(best["p99_ms"]) if best else None}


def _check_larger(result: dict, args: argparse.Namespace) -> dict:
    """``check`` on the package the bench served for the model larger than one GPU (its scores
    against LocalRanker on the CPU: the host needs the tables' bytes in memory, 207 GB fp32)."""
    from loadtest.bench import BenchOptions

    config = f"{args.strategy}-{result['shards']}"
    opts = BenchOptions(workload=str(LARGER), max_rows=None, configs=(config,), dtype=args.dtype, init="random",
                        artifacts=args.artifacts)
    package = opts.model_dir / "packages" / config
    out = Path(result["out"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "check", "--package", str(package), "--gpus",
           str(result["gpus"]), "--device", args.device, "--out", str(out)]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT)  # exit 1 = problems, listed in check.json
    return json.loads((out / "check.json").read_text())


def run_bench(args: argparse.Namespace) -> list[dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    results = [_bench_one("dlrmv2", n, args) for n in args.gpus_list]
    if args.larger_gpus:
        larger = _bench_one(str(LARGER), args.larger_gpus, args)
        larger["check"] = _check_larger(larger, args)
        results.append(larger)
    earlier = args.out / "multigpu.json"  # runs split over several commands add up in one table
    if earlier.exists():
        fresh = {(r["workload"], r["gpus"]) for r in results}
        results = [r for r in json.loads(earlier.read_text()) if (r["workload"], r["gpus"]) not in fresh] + results
        results.sort(key=lambda r: (r["workload"] != "dlrmv2", r["gpus"]))
    table = scaling_table(results, args.p99_ms)
    (args.out / "multigpu.md").write_text(table + "\n")
    (args.out / "multigpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    return results


def main(argv: list[str] | None = None) -> int:
    from recserve.planning import parse_bytes

    p = argparse.ArgumentParser(prog="benchmarks/multigpu.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="placement of the replicas and sampled scores against the CPU reference")
    c.add_argument("--package", type=Path, required=True)
    c.add_argument("--gpus", type=int, required=True)
    c.add_argument("--fake-gpus", action="store_true", help="tell Ray of --gpus GPUs the machine need not have")
    c.add_argument("--device", default="cuda")
    c.add_argument("--tower-gpu", choices=("shared", "own"), default="shared")
    c.add_argument("--requests", type=int, default=8, help="sampled requests scored both ways")
    c.add_argument("--tolerance", type=float, default=2e-3, help="max |served - CPU reference| score (fp16 wire)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--num-cpus", type=int, default=None)
    c.add_argument("--timeout", type=float, default=600.0, help="seconds for the app to serve and per request")
    c.add_argument("--out", type=Path, default=None, help="write check.json here")
    b = sub.add_parser("bench", help="dlrmv2 on 1/2/4 GPUs and the model larger than one GPU")
    b.add_argument("--gpus", dest="gpus_list", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4])
    b.add_argument("--larger-gpus", type=int, default=2, help="GPUs for dlrmv2-2x (0: skip it)")
    b.add_argument("--gpu-memory", type=parse_bytes, default=parse_bytes("141GB"))
    b.add_argument("--strategy", default="load")
    b.add_argument("--dtype", default="fp32")
    b.add_argument("--device", default="cuda")
    b.add_argument("--rates", default="20,50,100,200", help="offered requests/s (recserve bench --rates)")
    b.add_argument("--duration", type=float, default=20.0)
    b.add_argument("--closed-concurrency", type=int, default=16)
    b.add_argument("--p99-ms", type=float, default=60.0)
    b.add_argument("--artifacts", type=Path, default=Path("artifacts/multigpu"))
    b.add_argument("--discard-packages", action="store_true", help="delete each dlrmv2 package after its run "
                   "(small disks; the larger model's is kept for its score check)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results/multigpu"))
    t = sub.add_parser("transfer", help="pooled embeddings cuda:0 -> cuda:1: direct vs through pinned host memory")
    t.add_argument("--batch-sizes", type=lambda x: [int(v) for v in x.split(",")], default=[512, 4096, 65536])
    t.add_argument("--width", type=int, default=26 * 128, help="pooled values per example (dlrmv2: 26 x 128)")
    t.add_argument("--iters", type=int, default=50)
    t.add_argument("--out", type=Path, default=None, help="write transfer.json here")
    args = p.parse_args(argv)
    if args.command == "transfer":
        rows = run_transfer(args)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "transfer.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    if args.command == "check":
        result = run_check(args)
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "check.json").write_text(text + "\n")
        return 1 if result["problems"] else 0
    run_bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
