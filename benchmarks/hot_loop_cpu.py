"""A request's compute timed in a hot loop, no server: what the sharded stack's and the
monolith's stages cost when nothing else runs and every cache is warm, to set beside the
per-stage breakdown that `recserve bench` prints for the running servers at a low rate (the
difference is what a request pays for waking processes and threads from idle).

    .venv/bin/python benchmarks/hot_loop_cpu.py artifacts/bench/criteo-kaggle-rows100000-fp32/packages/load-2 \\
        --workload criteo-kaggle --max-rows 100000 [--batch 270] [--reps 200]

Prints one table: the shards' lookups (float16 out, as served), the tower's assembly and score
(what the `tower.score` stage runs), and the monolith's whole score (`lookup` + `tower`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, reps: int) -> float:
    for _ in range(max(reps // 10, 3)):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", help="a sharded package (recserve export / recserve bench's artifacts)")
    ap.add_argument("--workload", default="criteo-kaggle")
    ap.add_argument("--max-rows", type=int, default=None, help="the rows the package's tables were capped at")
    ap.add_argument("--batch", type=int, default=270, help="examples per request (the criteo-kaggle trace's mean)")
    ap.add_argument("--reps", type=int, default=200)
    opts = ap.parse_args(argv)

    import torch

    from recserve.package import ModelPackage
    from recserve.synth import TrafficGenerator
    from recserve.workloads import load_workload
    from serving.engine.local_ranker import LocalRanker
    from serving.engine.routing import Routing
    from serving.engine.shard import ShardCore

    pkg = ModelPackage.open(opts.package)
    local = LocalRanker.load(pkg)
    routing = Routing(pkg.manifest)
    shards = {k: ShardCore(pkg, k, output_dtype=torch.float16) for k in routing.columns}
    batch = TrafficGenerator(load_workload(opts.workload).with_max_rows(opts.max_rows), seed=1).batch(opts.batch)
    requests = routing.split(batch)
    parts = tuple(shards[k].lookup(requests[k]) if k in requests else None for k in range(routing.num_shards))
    sparse = routing.assemble_many([(opts.batch, parts)])
    rows = [
        ("shards' lookups, float16 out (sum)", _ms(lambda: [shards[k].lookup(r) for k, r in requests.items()], opts.reps)),
        ("tower: assemble [B, F, D] from the parts", _ms(lambda: routing.assemble_many([(opts.batch, parts)]), opts.reps)),
        ("tower: score", _ms(lambda: local.tower.score(batch.dense, sparse), opts.reps)),
        ("monolith: lookups + assemble + score", _ms(lambda: local.score_filtered(batch), opts.reps)),
    ]
    print(f"{opts.package}: {opts.batch} examples a request, {opts.reps} reps, torch threads {torch.get_num_threads()}")
    print(f"{'stage':<42} {'ms':>7}")
    print(f"{'-' * 42} {'-' * 7}")
    for name, ms in rows:
        print(f"{name:<42} {ms:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
