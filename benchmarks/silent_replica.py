"""A shard replica that stops answering without closing its connections, under load.

Against a running ``recserve serve --shard-replicas 2`` (a user's stack): 4 client threads send
requests of 128 examples back to back (5 s deadlines, every score checked against the
in-process model), one of shard-0's replica processes is SIGSTOPped for ``--stopped-s`` (what a
host gone from the network or a long pause looks like to its callers: the sockets stay open
and nothing comes back), then SIGCONTed. Prints requests, failures and latency per phase.

    .venv/bin/recserve serve --port PORT --feature-filter none --shard-replicas 2 &
    .venv/bin/python benchmarks/silent_replica.py --port PORT
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="the running stack's gRPC port")
    p.add_argument("--package", default=str(ROOT / "artifacts" / "default"), help="the package it serves")
    p.add_argument("--before-s", type=float, default=10.0)
    p.add_argument("--stopped-s", type=float, default=20.0)
    p.add_argument("--after-s", type=float, default=10.0)
    args = p.parse_args()

    import grpc

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from serving.api.client import RankingClient
    from serving.engine.local_ranker import LocalRanker

    manifest = ModelPackage.open(args.package).manifest
    client = RankingClient(f"127.0.0.1:{args.port}")
    client.wait_until_serving(manifest.name, timeout=300)
    gen = TrafficGenerator(manifest.workload, seed=7)
    batches = [gen.batch(128) for _ in range(8)]
    ranker = LocalRanker.load(args.package)
    refs = [ranker.score(b) for b in batches]
    records: list[tuple[float, float, str, float]] = []  # (start s, latency s, code, max |served - reference|)
    stop = threading.Event()
    t0 = time.monotonic()

    def worker(i: int) -> None:
        k = i
        while not stop.is_set():
            j = k % len(batches)
            k += 4
            b, start = batches[j], time.monotonic()
            try:
                got = client.predict(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()}, timeout=5)
                records.append((start - t0, time.monotonic() - start, "OK", float(np.max(np.abs(got - refs[j])))))
            except grpc.RpcError as e:
                records.append((start - t0, time.monotonic() - start, e.code().name, 0.0))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(args.before_s)
    pids = subprocess.run(["pgrep", "-f", r"ServeReplica:[^ ]*:shard-0(\.[a-z_]+)?( |$)"], capture_output=True, text=True).stdout.split()
    if len(pids) < 2:
        sys.exit(f"silent_replica: needs 2 replicas of shard-0, found processes {pids}")
    victim = int(pids[0])
    print(f"shard-0 replica processes {pids}; SIGSTOP {victim} for {args.stopped_s:g} s", flush=True)
    stopped_at = time.monotonic() - t0
    os.kill(victim, signal.SIGSTOP)
    try:
        time.sleep(args.stopped_s)
    finally:
        os.kill(victim, signal.SIGCONT)
    resumed_at = time.monotonic() - t0
    time.sleep(args.after_s)
    stop.set()
    for t in threads:
        t.join(10)
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores); requests by when they were sent:")
    for name, lo, hi in (("before", 0, stopped_at), ("stopped", stopped_at, resumed_at), ("after", resumed_at, 1e9)):
        r = [x for x in records if lo <= x[0] < hi]
        ms = np.array([x[1] for x in r if x[2] == "OK"]) * 1000
        failed = [x[2] for x in r if x[2] != "OK"]
        print(f"{name:8s} requests {len(r):5d}  failed {len(failed):3d} {sorted(set(failed))}  "
              f"p50 {np.percentile(ms, 50):6.1f} ms  p99 {np.percentile(ms, 99):7.1f} ms  max {ms.max():7.1f} ms  "
              f"max |served - reference| {max(x[3] for x in r):.2e}", flush=True)


if __name__ == "__main__":
    main()
