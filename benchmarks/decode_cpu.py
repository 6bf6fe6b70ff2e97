"""The edge's CPU per request, timed apart (no server): the protobuf parse of a PredictRequest,
its decode and validation (serving/api/codec.py), and within that the sparse features' checks
done over all features at once (what decode runs) against feature by feature (its fallback,
which names the first error), on each workload's trace. Prints one table.

    .venv/bin/python benchmarks/decode_cpu.py [--workloads criteo-kaggle,dlrmv2] [--requests 64]

Both servers (the Router and the monolith) pay these per request.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ms(fn, items: list) -> float:
    for it in items[:4]:
        fn(it)
    start = time.perf_counter()
    for it in items:
        fn(it)
    return (time.perf_counter() - start) / len(items) * 1000


def main() -> int:
    from loadtest.trace import encode_request, make_trace
    from recserve.v1 import ranker_pb2
    from recserve.workloads import load_workload
    from serving.api.codec import ModelSpec, _check_bags, _checked_at_once, decode_request

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="criteo-kaggle,dlrmv2")
    ap.add_argument("--requests", type=int, default=64, help="requests of each workload's trace, each timed")
    ap.add_argument("--repeat", type=int, default=5, help="passes over them")
    args = ap.parse_args()
    print(f"{'workload':>14} {'examples':>8} {'KB':>6} {'parse':>7} {'decode':>7} {'bags at once':>12} "
          f"{'per feature':>11}   (mean ms per request)")
    for name in args.workloads.split(","):
        w = load_workload(name)
        trace = make_trace(w, args.requests, seed=0)
        spec = ModelSpec(name=w.name, version="v", dense_features=w.dense_features,
                         rows={f: t.rows for t in w.tables for f in t.features},
                         served=tuple(f for t in w.tables for f in t.features), dropped=(), max_batch_size=1 << 20)
        wire = [encode_request(b).SerializeToString() for b in trace.batches] * args.repeat
        parsed = [ranker_pb2.PredictRequest.FromString(x) for x in wire]
        sparse = [(b.batch_size, {f: (x.values, x.lengths, x.weights) for f, x in b.sparse.items()})
                  for b in trace.batches] * args.repeat
        at_once = _ms(lambda s: _checked_at_once(spec, s[0], s[1]), sparse)
        per_feature = _ms(lambda s: {f: _check_bags(f, *bags, s[0], spec.rows[f]) for f, bags in s[1].items()}, sparse)
        print(f"{name:>14} {trace.batch_sizes.mean():>8.0f} {sum(map(len, wire)) / len(wire) / 1024:>6.0f} "
              f"{_ms(ranker_pb2.PredictRequest.FromString, wire):>7.3f} {_ms(lambda r: decode_request(r, spec), parsed):>7.3f} "
              f"{at_once:>12.3f} {per_feature:>11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
