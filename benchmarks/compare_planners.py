"""Compare recserve's sharding planner with torchrec's EmbeddingShardingPlanner.

Same tables, same topology, same yardstick: for each workload and shard count both
planners place the workload's tables on N GPUs of ``--hbm`` bytes each, and every
placement is scored with *our* model (per-shard bytes in storage dtype; cost = pooling
factor x dim x bytes per element x request rate, split in proportion to rows and columns),
so the figures are comparable. torchrec's own perf estimate (ms per rank, its
inference-mode estimators) is printed beside its rows.

torchrec runs without a GPU: ``Topology(compute_device="cuda")`` and an
EmbeddingBagCollection on the meta device are enough to plan. Its storage reservation
(``FixedPercentageStorageReservation(--reserve)``) keeps a fraction of HBM for everything
else; our planner gets the same per-shard cap: ``hbm x (1 - reserve)``.

How torchrec's shardings map onto shards (rank k = shard k):

- table_wise: the whole table on one rank, as our whole-table slices.
- row_wise / table_row_wise: row ranges on several ranks, as our row-wise slices.
- column_wise / table_column_wise: column ranges; each carries ``cols / dim`` of the
  cost (every lookup reads every column range) and ``rows x row_bytes(cols)`` bytes.
  grid_shard likewise with both fractions.
- data_parallel: a full copy on every rank; bytes count on every rank and the cost is
  split evenly, since any copy can serve a lookup.

torchrec, left to itself, replicates small models on every rank (data_parallel), which
for serving means replicas rather than shards; the ``torchrec (model-parallel)`` rows
restrict it to table/row/column-wise shardings with the fused HBM kernel, the same kind
of plan ours makes.

Usage (CPU only, ~30 s)::

    .venv/bin/python benchmarks/compare_planners.py
    .venv/bin/python benchmarks/compare_planners.py --workloads dlrmv2 --shards 8 --dtype fp16
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.modules.embedding_configs import DataType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as a script

from recserve.model import table_configs
from recserve.planning import parse_bytes, table_specs
from recserve.workloads import WorkloadConfig, load_workload
from sharding import PlannerError, TableSpec, plan, row_bytes

TORCH_DATA_TYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16}
MODEL_PARALLEL = ["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"]
BATCH_SIZE = 512  # torchrec's default; only its perf estimate depends on it


@dataclass(frozen=True)
class Scored:
    """One placement scored with our model (and torchrec's perf estimate, if any)."""

    planner: str
    bytes_per_shard: list[float]  # [N] bytes
    cost_per_shard: list[float]  # [N] our cost units
    pieces: int  # tables + slices placed (a replicated table counts once per rank)
    kinds: str  # sharding kinds used, e.g. "table_wise:22 row_wise:4"
    torchrec_ms: list[float] | None = None  # [N] torchrec's perf estimate per rank
    note: str = ""


def score_ours(tables: list[TableSpec], strategy: str, n: int, cap: int) -> Scored:
    p = plan(tables, strategy=strategy, num_shards=n, shard_memory=cap)
    whole = sum(s.is_whole for sh in p.shards for s in sh.slices)
    pieces = sum(len(sh.slices) for sh in p.shards)
    split_tables = len({s.table for sh in p.shards for s in sh.slices if not s.is_whole})
    return Scored(
        planner=f"recserve {strategy}",
        bytes_per_shard=[float(sh.bytes) for sh in p.shards],
        cost_per_shard=[sh.cost for sh in p.shards],
        pieces=pieces,
        kinds=f"whole:{whole} row_wise:{split_tables}" if split_tables else f"whole:{whole}",
    )


def torchrec_plan(workload: WorkloadConfig, n: int, *, hbm: int, reserve: float, dtype: str, model_parallel: bool):
    """torchrec's plan for ``workload`` on ``n`` GPUs; (sharding options, wall seconds)."""
    ebc = EmbeddingBagCollection(
        tables=table_configs(workload, data_type=TORCH_DATA_TYPE[dtype]), device=torch.device("meta")
    )
    topology = Topology(world_size=n, compute_device="cuda", hbm_cap=hbm, local_world_size=n)
    constraints = {
        t.name: ParameterConstraints(
            pooling_factors=[t.pooling_factor * len(t.features)],
            **(dict(sharding_types=MODEL_PARALLEL, compute_kernels=["fused"]) if model_parallel else {}),
        )
        for t in workload.tables
    }
    estimators = [
        EmbeddingPerfEstimator(topology=topology, constraints=constraints, is_inference=True),
        EmbeddingStorageEstimator(topology=topology, constraints=constraints, is_inference=True),
    ]
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=BATCH_SIZE,
        enumerator=EmbeddingEnumerator(
            topology=topology, batch_size=BATCH_SIZE, constraints=constraints, estimator=estimators
        ),
        storage_reservation=FixedPercentageStorageReservation(reserve),
        constraints=constraints,
        debug=False,
    )
    start = time.perf_counter()
    planner.plan(ebc, [EmbeddingBagCollectionSharder()])
    return planner._best_plan, time.perf_counter() - start  # the chosen ShardingOptions


def score_torchrec(options, tables: list[TableSpec], n: int, label: str) -> Scored:
    """Apply our bytes and cost model to torchrec's placement (see the module docstring)."""
    spec = {t.name: t for t in tables}
    nbytes, cost, ms = [0.0] * n, [0.0] * n, [0.0] * n
    kinds: Counter[str] = Counter()
    pieces = 0
    for so in options:
        t = spec[so.name]
        kinds[so.sharding_type] += 1
        replicated = so.sharding_type == "data_parallel"
        for sh in so.shards:
            rows, cols = sh.size  # [rows, cols] of this shard
            nbytes[sh.rank] += rows * row_bytes(cols, t.dtype)
            share = 1.0 / n if replicated else (rows / t.rows) * (cols / t.dim)
            cost[sh.rank] += t.cost * share
            ms[sh.rank] += sh.perf.total if sh.perf is not None else 0.0
            pieces += 1
    return Scored(
        planner=label,
        bytes_per_shard=nbytes,
        cost_per_shard=cost,
        pieces=pieces,
        kinds=" ".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
        torchrec_ms=ms,
    )


def row(workload: str, n: int, s: Scored) -> str:
    def mm(values: list[float]) -> tuple[float, float, float]:
        top, mean = max(values), sum(values) / len(values)
        return top, mean, (top / mean if mean else 1.0)

    b, c = mm(s.bytes_per_shard), mm(s.cost_per_shard)
    perf = f"{max(s.torchrec_ms):.3f} / {sum(s.torchrec_ms) / n:.3f}" if s.torchrec_ms else "-"
    return (
        f"| {workload} | {n} | {s.planner} | {b[0] / 1e9:.2f} | {b[1] / 1e9:.2f} | {b[2]:.3f} | "
        f"{c[0]:,.0f} | {c[1]:,.0f} | {c[2]:.3f} | {s.pieces} | {s.kinds} | {perf} |{s.note}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["criteo-kaggle", "dlrmv2"])
    ap.add_argument("--shards", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--dtype", choices=sorted(TORCH_DATA_TYPE), default="fp32")
    ap.add_argument("--hbm", type=parse_bytes, default=parse_bytes("80GiB"), help="HBM per GPU (H100: 80GiB)")
    ap.add_argument("--reserve", type=float, default=0.15, help="fraction of HBM kept for non-embedding use")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # torchrec warns about directly built Topology objects

    cap = int(args.hbm * (1 - args.reserve))  # bytes per shard for embedding tables
    print(f"topology: N x {args.hbm / 2**30:.0f} GiB HBM, {args.reserve:.0%} reserved -> "
          f"{cap:,} bytes ({cap / 2**30:.1f} GiB) per shard for tables; dtype {args.dtype}; "
          f"torchrec batch size {BATCH_SIZE}")
    print()
    print("| workload | shards | planner | max GB | mean GB | bytes max/mean | max cost | mean cost "
          "| cost max/mean | pieces | shardings | torchrec est. ms max / mean |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        workload = load_workload(name)
        tables = table_specs(workload, args.dtype)
        for n in args.shards:
            results: list[Scored] = []
            for strategy in ("table", "capacity", "load"):
                try:
                    results.append(score_ours(tables, strategy, n, cap))
                except PlannerError as e:
                    print(f"recserve {strategy}: cannot place: {e}", file=sys.stderr)
            for model_parallel in (False, True):
                label = "torchrec (model-parallel)" if model_parallel else "torchrec (default)"
                print(f"planning {name} on {n} shards with {label}...", file=sys.stderr, flush=True)
                try:
                    options, secs = torchrec_plan(
                        workload, n, hbm=args.hbm, reserve=args.reserve, dtype=args.dtype,
                        model_parallel=model_parallel,
                    )
                except Exception as e:  # torchrec raises its own PlannerError when nothing fits
                    print(f"{label}: cannot place: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                results.append(score_torchrec(options, tables, n, label))
            for s in results:
                print(row(name, n, s), flush=True)
    print()
    print("bytes: table bytes per shard in storage dtype (GB = 1e9 bytes). cost: our estimate of "
          "bytes of rows read per sample (pooling factor x dim x bytes/element), per shard. "
          "pieces: tables or slices placed (a replicated table counts once per rank).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
