"""The router's and the tower's own per-batch CPU on a workload's request shapes, timed apart (no
Ray, no network): concatenating coalesced requests, the split by shard, the ids frame the router
sends, and the tower's assembly of the shards' pooled parts on the CPU. Prints one table.

    .venv/bin/recserve export --init random --workload dlrmv2 --max-rows 20000 --dtype int8 \\
        --strategy load --shards 2 --out /tmp/dl2
    .venv/bin/python benchmarks/router_batch_cpu.py /tmp/dl2 --workload dlrmv2 --max-rows 20000

What it answers: whether the part of a sharded batch's time that the replicas' stages do not
explain (issue 19's H100 breakdown) is the router's own array work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def main() -> int:
    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.workloads import load_workload
    from serving.app.deployments import _shard_frame
    from serving.engine.channel import _describe
    from serving.engine.coalesce import concat_batches
    from serving.engine.routing import Routing

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--workload", default="dlrmv2")
    ap.add_argument("--max-rows", type=int, default=20_000)
    ap.add_argument("--requests", default="1,2,4", help="requests per coalesced batch, comma-separated")
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    routing = Routing(ModelPackage.open(args.package).manifest)
    trace = make_trace(load_workload(args.workload).with_max_rows(args.max_rows or None), 64, seed=0)
    print(f"{args.workload}: {trace.batch_sizes.mean():.0f} examples per request on average; "
          f"{args.repeat} repeats, ms per batch")
    print(f"{'requests':>8} {'examples':>8} {'concat':>7} {'split':>7} {'ids frame':>9} {'frame KB':>8} "
          f"{'assemble':>8} {'pooled KB':>9}")
    for k in (int(x) for x in args.requests.split(",")):
        batches = list(trace.batches[:k])
        batch = concat_batches(batches)
        requests = routing.split(batch)

        def frame() -> bytes:
            ids = []
            for s in range(routing.num_shards):
                ids += [None, None, None] if s not in requests else _shard_frame(requests[s])
            return b"".join(_describe([batch.dense, *ids])[1])

        B = batch.batch_size
        rng = np.random.default_rng(0)
        pooled = tuple(rng.random((B, len(routing.columns[s]) * routing.dim), dtype=np.float32).astype(np.float16)
                       for s in range(routing.num_shards))
        print(f"{k:>8} {B:>8} {_ms(lambda: concat_batches(batches), args.repeat):>7.2f} "
              f"{_ms(lambda: routing.split(batch), args.repeat):>7.2f} {_ms(frame, args.repeat):>9.2f} "
              f"{len(frame()) / 1024:>8.0f} {_ms(lambda: routing.assemble_many([(B, pooled)]), args.repeat):>8.2f} "
              f"{sum(p.nbytes for p in pooled) / 1024:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
