"""Where a dense-tower call runs, and what it costs: the monolith's tower stage (float32 shard
outputs -> Routing.assemble -> TowerCore.score) and the sharded stack's tower path (float16 parts
-> Routing.assemble_many -> TowerCore.score, as DenseTower._score_many runs it), timed on the main
thread, on one worker thread that is always the same, and on a pool of threads, as
``asyncio.to_thread`` gives them (benchmarks/results/dataplane-2core/one-thread-README.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tower_thread.py --sizes 64,400,1000

Needs the bench's packages (``recserve bench --workload criteo-kaggle --max-rows 100000`` builds
them under artifacts/bench/). Prints a table of medians and P90s per batch size.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recserve.package import ModelPackage  # noqa: E402
from recserve.synth import TrafficGenerator  # noqa: E402
from serving.engine.local_ranker import LocalRanker  # noqa: E402
from serving.engine.routing import Routing  # noqa: E402
from serving.engine.shard import ShardCore  # noqa: E402
from serving.engine.tower import TowerCore  # noqa: E402

PACKAGES = ROOT / "artifacts" / "bench" / "criteo-kaggle-rows100000-fp32" / "packages"


def _timed(runs: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Median and P90 ms per run, the runs interleaved in ``rounds`` rounds of ``calls // rounds``
    calls each, so that the machine's drift falls on all of them alike."""
    for run in runs.values():
        for _ in range(5):  # warm-up
            run()
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(max(1, calls // rounds)):
                t0 = time.perf_counter()
                run()
                ms[name].append((time.perf_counter() - t0) * 1000)
    return {name: (float(np.median(v)), float(np.percentile(v, 90))) for name, v in ms.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", default=str(PACKAGES), help="the bench's packages (singular-1 and load-2)")
    ap.add_argument("--sizes", default="64,400,1000", help="examples per call, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--pool", type=int, default=6, help="threads of the pool (asyncio.to_thread's on 2 cores: 6)")
    ap.add_argument("--calls", type=int, default=200, help="calls per path and place")
    ap.add_argument("--rounds", type=int, default=10, help="the places and paths take turns this many times")
    args = ap.parse_args()
    for name in ("singular-1", "load-2"):
        if not (Path(args.packages) / name / "manifest.json").exists():
            sys.exit(f"no package {Path(args.packages) / name}: run recserve bench --workload criteo-kaggle "
                     "--max-rows 100000 once to build the bench's packages")
    torch.set_num_threads(args.threads)
    mono = LocalRanker.load(str(Path(args.packages) / "singular-1"))
    pkg = ModelPackage.open(str(Path(args.packages) / "load-2"))
    routing = Routing(pkg.manifest)
    tower = TowerCore.from_package(pkg, device="cpu", dtype="float32", input_dtype="float16")
    shards = [ShardCore(pkg, k, device="cpu", output_dtype="float16") for k in range(routing.num_shards)]
    gen = TrafficGenerator(pkg.manifest.workload, seed=1)
    places = {"main thread": None, "one thread, always the same": ThreadPoolExecutor(1),
              f"a pool of {args.pool} threads": ThreadPoolExecutor(args.pool)}
    print(f"torch threads {args.threads}; median / P90 ms of {args.calls} calls, in {args.rounds} interleaved rounds")
    print(f"{'examples':>8}  {'where':<30}  {'monolith tower':>16}  {'stack tower':>16}")
    for size in (int(s) for s in args.sizes.split(",")):
        batch = gen.batch(size)
        outs = {k: mono.shards[k].lookup(r) for k, r in mono.routing.split(batch).items()}
        parts = tuple(np.asarray(shards[k].lookup(r)) for k, r in sorted(routing.split(batch).items()))

        def monolith(b=batch, o=outs, n=size):
            return mono.tower.score(b.dense, mono.routing.assemble(n, o))

        def stack(b=batch, p=parts, n=size):
            return tower.score(b.dense, routing.assemble_many([(n, p)]))

        gap = float(np.abs(monolith() - stack()).max())
        assert gap < 1e-2, f"the two paths disagree by {gap}"  # float16 parts against float32 outputs
        runs = {}
        for where, pool in places.items():
            for path, fn in (("monolith", monolith), ("stack", stack)):
                runs[(where, path)] = fn if pool is None else (lambda f=fn, ex=pool: ex.submit(f).result())
        figures = _timed(runs, args.calls, args.rounds)
        for where in places:
            row = ["%.2f / %.2f" % figures[(where, path)] for path in ("monolith", "stack")]
            print(f"{size:>8}  {where:<30}  {row[0]:>16}  {row[1]:>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
