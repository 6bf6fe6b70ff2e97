"""Autoscaling per shard from the Serve config, under a load ramp: replicas up and down, P99 over time.

    .venv/bin/python benchmarks/autoscale.py [--phases 4:30,40:40,4:60] [--out benchmarks/results/autoscale]

Starts a local Ray (127.0.0.1, token auth), deploys deploy/serve.yaml with `serve deploy` (the
documented path) with three changes for a short run on a small machine: the package is the
tiny model in 2 shards (exported here) or --package, autoscaling reacts in seconds (metrics
averaged over 5 s, upscale after 2 s, downscale after 10 s, at most 3 replicas; the Router at 2 requests in flight per
replica, shards and tower by the yaml's BusyPolicy, --target-busy to change its target), and
the gRPC/HTTP ports are free ones. Then it offers the load of each phase (requests/s : seconds)
open-loop from a thread pool, records every request's latency and outcome, and polls each
deployment's running replicas every second. Outputs: autoscale.csv (per second: offered
rate, completed, errors, P99 ms, replicas per deployment), autoscale.png (P99 and replicas
over time), autoscale.txt (the summary printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEPLOYMENTS = ("shard-0", "shard-1", "DenseTower", "Router")
FAST = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 2,
        "downscale_delay_s": 10, "look_back_period_s": 5}  # shards and tower keep the yaml's BusyPolicy (target_busy: --target-busy)


def tiny_package(out: Path) -> Path:
    from recserve.export import export_package
    from recserve.planning import plan_workload
    from recserve.train import train
    from recserve.workloads import load_workload

    pkg = out / "tiny-table-2"
    if not (pkg / "manifest.json").exists():
        tiny = load_workload("tiny")
        state = out / "tiny.pt"
        train(tiny, state, steps=60, progress=False)
        export_package(tiny, state, pkg, plan=plan_workload(tiny, strategy="table", num_shards=2), progress=False)
    return pkg


def config_for(package: Path, grpc_port: int, http_port: int, target_busy: float | None = None) -> dict:
    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    config["grpc_options"]["port"], config["http_options"]["port"] = grpc_port, http_port
    [app] = config["applications"]
    if app["args"].get("grpc_listen"):  # the routers answer gRPC themselves (the yaml's default)
        app["args"]["grpc_listen"] = f"127.0.0.1:{grpc_port}"
    app["args"]["package"] = str(package)
    app["args"]["feature_filter"] = None
    for d in app["deployments"]:
        d["autoscaling_config"].update(FAST)
        if target_busy is not None and "target_busy" in d["autoscaling_config"].get("policy", {}).get("policy_kwargs", {}):
            d["autoscaling_config"]["policy"]["policy_kwargs"]["target_busy"] = target_busy
    return config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/autoscale.py")
    p.add_argument("--phases", default="4:30,40:45,4:60", help="RATE:SECONDS,... offered requests/s per phase")
    p.add_argument("--batch", type=int, default=64, help="examples per request")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "autoscale")
    p.add_argument("--package", type=Path, default=None,
                   help="a package of 2 shards to serve (default: the tiny model, exported here)")
    p.add_argument("--target-busy", type=float, default=None,
                   help="the shards' and tower's BusyPolicy target (default: the yaml's)")
    args = p.parse_args(argv)
    phases = [(float(r), float(s)) for r, s in (ph.split(":") for ph in args.phases.split(","))]

    from serving.ops.loopback import ray_on_loopback

    ray_on_loopback()
    import ray
    from ray import serve

    from recserve.synth import TrafficGenerator
    from serving.api.client import RankingClient
    from serving.ops.loopback import HOOK
    from serving.ops.ports import free_port

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recserve-autoscale-"))
    package = args.package.resolve() if args.package else tiny_package(work)
    from recserve.package import ModelPackage

    manifest = ModelPackage.open(package).manifest
    grpc_port = free_port()
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ctx = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=free_port(), configure_logging=False, log_to_driver=False,
                   runtime_env={"worker_process_setup_hook": HOOK})
    rows: list[dict] = []
    try:
        config = config_for(package, grpc_port, free_port(), args.target_busy)
        (work / "serve.yaml").write_text(yaml.safe_dump(config))
        env = dict(os.environ, RAY_AUTH_MODE="token")
        subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(work / "serve.yaml"),
                        "-a", f"http://{ctx.dashboard_url}"], check=True, env=env, cwd=ROOT)
        client = RankingClient(f"127.0.0.1:{grpc_port}")
        print("autoscale: deployed; waiting for the replicas ...", flush=True)
        client.wait_until_serving(manifest.name, timeout=600)
        while any(n == 0 for n in replicas_running(serve).values()):
            time.sleep(1)
        batches = [TrafficGenerator(manifest.workload, seed=s).batch(args.batch) for s in range(16)]
        requests = [(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()}) for b in batches]
        records: list[tuple[float, float, bool]] = []  # (start s, latency ms, ok)
        lock = threading.Lock()
        t0 = time.monotonic()

        def one(i: int, start: float) -> None:
            dense, sparse = requests[i % len(requests)]
            ok = True
            try:
                client.predict(dense, sparse, timeout=10)
            except Exception:  # noqa: BLE001  counted
                ok = False
            with lock:
                records.append((start - t0, (time.monotonic() - start) * 1000, ok))

        replicas_log: list[tuple[float, dict]] = []
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                replicas_log.append((time.monotonic() - t0, replicas_running(serve)))
                stop.wait(1.0)

        poller = threading.Thread(target=poll)
        poller.start()
        offered: list[tuple[float, float, float]] = []
        with ThreadPoolExecutor(64) as pool:
            i, at = 0, time.monotonic()
            for rate, seconds in phases:
                print(f"autoscale: t={at - t0:5.0f}s offering {rate:g} req/s for {seconds:g}s; running replicas "
                      f"{replicas_log[-1][1] if replicas_log else '-'}", flush=True)
                offered.append((at - t0, at - t0 + seconds, rate))
                end = at + seconds
                while at < end:
                    delay = at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(one, i, time.monotonic())
                    i += 1
                    at += 1.0 / rate
        stop.set()
        poller.join()
        rows = per_second(records, replicas_log, offered)
    finally:
        serve.shutdown()
        ray.shutdown()
    write(rows, args.out, phases, args.batch, manifest.name)
    return 0


def replicas_running(serve) -> dict[str, int]:
    app = serve.status().applications.get("recserve")
    if app is None:
        return {d: 0 for d in DEPLOYMENTS}
    return {d: int(app.deployments[d].replica_states.get("RUNNING", 0)) if d in app.deployments else 0
            for d in DEPLOYMENTS}


def per_second(records, replicas_log, offered) -> list[dict]:
    end = int(max(r[0] for r in records)) + 1
    rows = []
    for sec in range(end):
        lat = [ms for t, ms, ok in records if sec <= t < sec + 1 and ok]
        errors = sum(1 for t, _, ok in records if sec <= t < sec + 1 and not ok)
        rate = next((r for a, b, r in offered if a <= sec < b), 0.0)
        reps = next((r for t, r in reversed(replicas_log) if t <= sec + 1), {d: 0 for d in DEPLOYMENTS})
        rows.append({"second": sec, "offered_rps": rate, "ok": len(lat), "errors": errors,
                     "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else "",
                     **{f"replicas_{d}": reps.get(d, 0) for d in DEPLOYMENTS}})
    return rows


def write(rows: list[dict], out: Path, phases, batch: int, model: str = "tiny") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "autoscale.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    secs = [r["second"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(secs, [r["p99_ms"] if r["p99_ms"] != "" else np.nan for r in rows], label="P99 ms (per second)")
    ax1b = ax1.twinx()
    ax1b.step(secs, [r["offered_rps"] for r in rows], color="grey", where="post", label="offered req/s")
    ax1.set_ylabel("P99 latency, ms")
    ax1b.set_ylabel("offered requests/s")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="upper right")
    for d in DEPLOYMENTS:
        ax2.step(secs, [r[f"replicas_{d}"] for r in rows], where="post", label=d)
    ax2.set_ylabel("running replicas")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper left")
    fig.suptitle(f"recserve autoscaling per deployment ({model}, 2 shards, {batch} examples/request; "
                 f"phases {', '.join(f'{r:g}/s x {s:g}s' for r, s in phases)})")
    fig.tight_layout()
    fig.savefig(out / "autoscale.png", dpi=110)
    total = sum(r["ok"] for r in rows)
    errors = sum(r["errors"] for r in rows)
    peak = {d: max(r[f"replicas_{d}"] for r in rows) for d in DEPLOYMENTS}
    last = {d: rows[-1][f"replicas_{d}"] for d in DEPLOYMENTS}
    summary = (f"autoscale: {total} requests OK, {errors} failed; autoscaling_config per deployment {json.dumps(FAST)}\n"
               f"  peak replicas {peak}\n  replicas at the end {last}\n"
               f"  wrote {out / 'autoscale.csv'}, {out / 'autoscale.png'}\n")
    print(summary, end="")
    (out / "autoscale.txt").write_text(summary)


if __name__ == "__main__":
    raise SystemExit(main())
