"""``recserve plan``: a workload's tables -> a sharding plan, printed and optionally saved.

This module is the bridge between workloads (recserve) and the pure planner (sharding):
:func:`table_specs` turns a workload's tables into planner input; :func:`parse_bytes`
reads sizes such as ``512MiB`` or ``80GB``. Light imports only (argparse, json), so the
CLI starts fast.

Usage::

    recserve plan --workload dlrmv2 --strategy load --shards 8 --shard-memory 80GB --out plan.json
    recserve plan --workload dlrmv2-2x --strategy load --gpus 2 --gpu-memory 141GB   # shards from the GPUs
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from recserve.workloads import WorkloadConfig, WorkloadError, load_workload
from recserve.layout import dense_shapes, interaction_width
from sharding import (
    DTYPES,
    STRATEGIES,
    TOWER_GPUS,
    GpuReserve,
    GpuTopology,
    PlannerError,
    ShardPlan,
    TableSpec,
    plan,
    plan_for_gpus,
    plan_report,
)

EXIT_CANNOT_PLAN = 2  # bad input or a placement that is impossible

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``"1000"``, ``"512MiB"``, ``"2GiB"``, ``"1GB"``, ``"1.5GiB"`` -> bytes.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
    powers of 1024; case does not matter. Raises ValueError naming the text otherwise.
    """
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"not a size: {text!r} (use bytes or a number with B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    try:
        value = Decimal(m.group(1)) * _UNITS[unit]
    except InvalidOperation:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"not a size: {text!r}") from None
    if value != value.to_integral_value():
        raise ValueError(f"not a whole number of bytes: {text!r} = {value} bytes")
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def table_specs(
    workload: WorkloadConfig, dtype: str, *, request_rates: dict[str, float] | None = None
) -> list[TableSpec]:
    """Planner input for ``workload``'s tables stored in ``dtype``, in model order.

    A table read by several features gets ``pooling_factor x number of features`` lookups
    per request. ``request_rates`` (table name -> relative rate, default 1.0: every request
    carries every feature) scales a table's cost, e.g. for faded or optional features.
    """
    rates = dict(request_rates or {})
    unknown = set(rates) - {t.name for t in workload.tables}
    if unknown:
        raise ValueError(f"request_rates: unknown table(s) {sorted(unknown)}")
    return [
        TableSpec(
            name=t.name,
            rows=t.rows,
            dim=t.dim,
            pooling_factor=t.pooling_factor * len(t.features),
            request_rate=rates.get(t.name, 1.0),
            dtype=dtype,  # type: ignore[arg-type]
        )
        for t in workload.tables
    ]


def plan_workload(
    workload: WorkloadConfig,
    *,
    strategy: str,
    num_shards: int,
    shard_memory: int | None = None,
    dtype: str = "fp32",
) -> ShardPlan:
    """Plan ``workload``'s tables (what ``recserve plan`` and ``recserve export`` call)."""
    return plan(table_specs(workload, dtype), strategy=strategy, num_shards=num_shards, shard_memory=shard_memory)


# Examples in one batched tower call that its activation memory is sized for.
TOWER_BATCH = 65_536


def tower_bytes(workload: WorkloadConfig, *, batch: int = TOWER_BATCH) -> int:
    """Bytes one dense tower replica takes on its GPU: fp32 weights, plus activations of a
    ``batch``-example call (its [B, interaction width] input and its two widest layers, fp32)."""
    weights = sum(math.prod(shape) for shape in dense_shapes(workload).values())
    widths = [interaction_width(workload), *workload.bottom_mlp, *workload.top_mlp]
    widest = sorted(widths)[-2:]
    return 4 * (weights + batch * (interaction_width(workload) + sum(widest)))


def plan_workload_for_gpus(
    workload: WorkloadConfig,
    *,
    strategy: str,
    topology: GpuTopology,
    num_shards: int | None = None,
    dtype: str = "fp32",
) -> ShardPlan:
    """Plan ``workload``'s tables over the GPUs of ``topology`` (shard count chosen if None)."""
    return plan_for_gpus(table_specs(workload, dtype), strategy=strategy, topology=topology, num_shards=num_shards)


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``recserve`` subcommands."""
    p = subparsers.add_parser(
        "plan",
        help="place a workload's embedding tables on shards and print the plan",
        description=(
            "Place a workload's embedding tables on shards. Prints per-shard bytes, estimated "
            "lookup cost and tables, then max/mean balance figures. Exits 2 when the tables "
            "cannot be placed, naming the table, its size and the room left."
        ),
    )
    p.add_argument("--workload", required=True, help="bundled name (tiny, criteo-kaggle, dlrmv2) or a JSON file")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards (singular: 1); required without --gpus, chosen by the planner with it")
    p.add_argument(
        "--shard-memory",
        type=_size_arg,
        default=None,
        metavar="BYTES",
        help="per-shard cap: bytes or 512MiB, 2GiB, 1GB (required by capacity)",
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="storage dtype of every table (default fp32)")
    p.add_argument("--max-rows", type=int, default=None, metavar="N", help="cap every table at N rows")
    p.add_argument("--out", type=Path, default=None, help="write the plan as JSON here")
    g = p.add_argument_group(
        "GPUs (--gpus): each shard's memory from the GPU's",
        "per-shard cap = (GPU memory - reserve fraction x GPU memory - reserve fixed - dense tower(s)) / shard "
        "replicas per GPU, with ceil(shards x replicas / shard GPUs) replicas per GPU; serve with --gpus N")
    g.add_argument("--gpus", type=int, default=None, metavar="N", help="GPUs of the host that serve the package")
    g.add_argument("--gpu-memory", "--device-memory", type=_size_arg, default=None, metavar="BYTES",
                   help="memory of one GPU, e.g. 141GB (H200), 80GB (H100)")
    g.add_argument("--shard-replicas", type=int, default=1, help="replicas per shard deployment (default 1)")
    g.add_argument("--tower-gpu", choices=TOWER_GPUS, default="shared",
                   help="the dense tower beside the shards (shared, default) or on a GPU of its own")
    g.add_argument("--gpu-reserve-fraction", type=float, default=GpuReserve.fraction,
                   help=f"fraction of each GPU kept free (CUDA context, allocator; default {GpuReserve.fraction})")
    g.add_argument("--gpu-reserve", type=_size_arg, default=GpuReserve.fixed, metavar="BYTES",
                   help="bytes kept free on each GPU besides the fraction (CUDA graphs, buffers; default 4GiB)")
    p.set_defaults(handler=run_plan)
    return p


register = add_plan_parser  # what recserve/cli.py calls


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``recserve plan``; returns the exit code."""
    try:
        workload = load_workload(args.workload).with_max_rows(args.max_rows)
        topology = _topology(args, workload)
        if topology is not None:
            result = plan_workload_for_gpus(
                workload, strategy=args.strategy, topology=topology, num_shards=args.shards, dtype=args.dtype
            )
        else:
            result = plan_workload(
                workload,
                strategy=args.strategy,
                num_shards=args.shards,
                shard_memory=args.shard_memory,
                dtype=args.dtype,
            )
    except (WorkloadError, PlannerError, ValueError) as e:
        kind = getattr(getattr(e, "error_type", None), "name", "INVALID_INPUT")
        print(f"recserve plan: cannot plan {args.workload!r} ({kind}): {e}", file=sys.stderr)
        return EXIT_CANNOT_PLAN
    print(f"workload: {workload.name}  tables: {len(workload.tables)}")
    if topology is not None:
        print(f"gpus: {topology.describe(result.num_shards)}")
    print(plan_report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def _topology(args: argparse.Namespace, workload: WorkloadConfig) -> GpuTopology | None:
    """The GPUs of --gpus (None without it); ValueError naming the flag that is wrong."""
    if args.gpus is None:
        if args.shards is None:
            raise ValueError("--shards: required (or give --gpus and --gpu-memory to have it chosen)")
        return None
    if args.gpu_memory is None:
        raise ValueError("--gpu-memory: required with --gpus (e.g. 141GB for an H200)")
    if args.shard_memory is not None:
        raise ValueError("--shard-memory: not with --gpus (the per-shard cap comes from --gpu-memory)")
    return GpuTopology(
        gpus=args.gpus, gpu_memory=args.gpu_memory, shard_replicas=args.shard_replicas, tower=args.tower_gpu,
        tower_bytes=tower_bytes(workload),
        reserve=GpuReserve(fraction=args.gpu_reserve_fraction, fixed=args.gpu_reserve),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m recserve.planning ...``: the plan command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="recserve")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
