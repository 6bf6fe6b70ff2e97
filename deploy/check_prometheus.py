"""Scrape a running `recserve serve` stack with a real Prometheus and print the recserve
series it got.

    .venv/bin/python deploy/check_prometheus.py [--seconds 30] [--out deploy/results/prometheus-check.txt]

Reads the stack's addresses from the state file `recserve serve` writes (artifacts/serving.json:
its gRPC port and Ray's metrics-export address), starts Debian's `prometheus` (installed with
apt-get if it is missing and this runs as root) on 127.0.0.1 with a temporary copy of
deploy/prometheus.yml pointed at that address, sends light traffic through RankingClient so
every request-path metric has samples, then lists each `recserve` metric Prometheus stored
with its series count and a sample value. Exit 1 if a metric of serving/app/deployments.py is
missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the request-path metrics of serving/app/deployments.py, as Ray exports them (prefix ray_)
EXPECTED = (
    "ray_recserve_requests_total",
    "ray_recserve_request_ms_bucket",
    "ray_recserve_shards_per_request_bucket",
    "ray_recserve_request_examples_bucket",
    "ray_recserve_shard_batch_examples_bucket",
    "ray_recserve_shard_lookup_ms_bucket",
    "ray_recserve_tower_batch_examples_bucket",
)


def ensure_prometheus() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    if shutil.which("apt-get") and hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        print("prometheus: not installed; apt-get install -y prometheus ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "prometheus"], check=True,
                       env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        path = shutil.which("prometheus")
    if not path:
        sys.exit("prometheus: not found; install Debian's package: sudo apt-get install prometheus")
    return path


def query(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())["data"]


def send_traffic(grpc_port: int, stop: threading.Event) -> list[str]:
    """~10 requests/s of the served model's shape until ``stop``; returns the outcomes."""
    import numpy as np

    from serving.api.client import RankingClient

    outcomes: list[str] = []
    with RankingClient(f"127.0.0.1:{grpc_port}") as client:
        info = client.model_info()
        rng = np.random.default_rng(0)
        dense = rng.standard_normal((8, info.dense_features)).astype(np.float32)
        sparse = {f: (np.zeros(8, np.int64), np.ones(8, np.int32)) for f in info.features}  # id 0, one per example
        while not stop.is_set():
            try:
                client.predict(dense, sparse, timeout=10)
                outcomes.append("OK")
            except Exception as e:  # noqa: BLE001  reported
                outcomes.append(type(e).__name__)
            time.sleep(0.1)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/check_prometheus.py")
    p.add_argument("--state", type=Path, default=None, help="state file of the running stack "
                   "(default: artifacts/serving.json)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long Prometheus scrapes (default 30)")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)

    from serving.ops.state import state_path
    from serving.ops.ports import free_port

    state_file = args.state or state_path()
    try:
        state = json.loads(state_file.read_text())
    except OSError:
        sys.exit(f"{state_file}: no running stack (start one: .venv/bin/python -m recserve.cli serve)")
    binary = ensure_prometheus()
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    config = (ROOT / "deploy" / "prometheus.yml").read_text()
    config = config.replace("scrape_interval: 15s", "scrape_interval: 2s")
    work = Path(tempfile.mkdtemp(prefix="recserve-prometheus-"))
    sd = work / "targets.json"
    sd.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [state["metrics"]]}]))
    config = config.replace("/tmp/ray/session_latest/prom_metrics_service_discovery.json", str(sd))
    (work / "prometheus.yml").write_text(config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT,
    )
    stop = threading.Event()
    outcomes: list[str] = []
    sender = threading.Thread(target=lambda: outcomes.extend(send_traffic(state["grpc_port"], stop)))
    sender.start()
    lines = [f"# {version}; stack {state['dashboard']} (metrics {state['metrics']}); scraped {args.seconds:.0f}s "
             f"every 2s; started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"]
    try:
        time.sleep(args.seconds)
        stop.set()
        sender.join()
        time.sleep(4)  # one more scrape after the last request
        targets = query(base, "/api/v1/targets")["activeTargets"]
        lines.append("# targets: " + ", ".join(f"{t['scrapeUrl']} {t['health']}" for t in targets))
        lines.append(f"# traffic: {len(outcomes)} requests, {outcomes.count('OK')} OK")
        names = sorted(n for n in query(base, "/api/v1/label/__name__/values") if "recserve" in n)
        lines.append(f"{'metric':<52} {'series':>6}  sample")
        for name in names:
            series = query(base, "/api/v1/query", query=name)["result"]
            top = max(series, key=lambda s: float(s["value"][1]))
            labels = {k: v for k, v in top["metric"].items()
                      if k in ("deployment", "code", "le", "feature", "model", "replica")}
            lines.append(f"{name:<52} {len(series):>6}  {top['value'][1]} {labels}")
        missing = [m for m in EXPECTED if m not in names]
        lines.append(f"# missing: {', '.join(missing) or 'none'}")
    finally:
        stop.set()
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
