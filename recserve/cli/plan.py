"""``recserve plan``: a workload's tables -> a sharding plan, printed and optionally saved.

    recserve plan --workload dlrmv2 --strategy load --shards 8 --shard-memory 80GB --out plan.json
    recserve plan --workload dlrmv2-2x --strategy load --gpus 2 --gpu-memory 141GB   # shards from the GPUs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recserve.cli.types import Subcommand
from recserve.planning import parse_bytes, plan_workload, plan_workload_for_gpus, table_specs, tower_bytes
from recserve.workloads import WorkloadConfig, WorkloadError, load_workload
from sharding import DTYPES, STRATEGIES, TOWER_GPUS, GpuReserve, GpuTopology, PlannerError, ShardPlan, plan_report

EXIT_CANNOT_PLAN = 2  # bad input or a placement that is impossible


def _size_arg(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class Plan(Subcommand):
    name = "plan"
    help = "place a workload's embedding tables on shards and print the plan"
    description = (
        "Place a workload's embedding tables on shards. Prints per-shard bytes, estimated "
        "lookup cost and tables, then max/mean balance figures. Exits 2 when the tables "
        "cannot be placed, naming the table, its size and the room left."
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
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
        h = p.add_argument_group(
            "hosts (--hosts): each shard's memory from the host's (several Ray nodes; docs/multinode.md)",
            "per-shard cap = (host memory - 40%% (Ray's object store, the OS) - 8GiB (processes)) / shard replicas "
            "per host; serve with recserve serve --address HEAD --place-on-hosts")
        h.add_argument("--hosts", type=int, default=None, metavar="N", help="hosts (Ray nodes) that hold the shards")
        h.add_argument("--host-memory", type=_size_arg, default=None, metavar="BYTES",
                       help="memory of one host, e.g. 512GB")

    def run(self, args: argparse.Namespace) -> int:
        return run_plan(args)


COMMANDS = (Plan,)


def run_plan(args: argparse.Namespace) -> int:
    """Handler of ``recserve plan``; returns the exit code."""
    try:
        workload = load_workload(args.workload).with_max_rows(args.max_rows)
        if args.hosts is not None:
            return _run_host_plan(args, workload)
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
    _write_plan(result, args.out)
    return 0


def _run_host_plan(args: argparse.Namespace, workload: WorkloadConfig) -> int:
    """``recserve plan --hosts N --host-memory BYTES``: the plan and which host holds each shard."""
    from sharding.hosts import HostTopology, assign_hosts, plan_for_hosts

    if args.host_memory is None or args.gpus is not None or args.shard_memory is not None:
        raise ValueError("--hosts: needs --host-memory, and neither --gpus nor --shard-memory")
    topology = HostTopology(hosts=args.hosts, host_memory=args.host_memory, shard_replicas=args.shard_replicas)
    result = plan_for_hosts(table_specs(workload, args.dtype), strategy=args.strategy, topology=topology,
                            num_shards=args.shards)
    assignment = assign_hosts(result, {f"h{i}": topology.usable_memory for i in range(args.hosts)},
                              shard_replicas=args.shard_replicas)
    print(f"workload: {workload.name}  tables: {len(workload.tables)}")
    print(f"hosts: {topology.describe(result.num_shards)}")
    print(plan_report(result))
    print(assignment)
    _write_plan(result, args.out)
    return 0


def _write_plan(result: ShardPlan, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {out}")


def served_tower_bytes(workload: WorkloadConfig) -> int:
    """A tower replica's GPU bytes as `recserve serve` runs it on a GPU by default: with the ring
    its shards write pooled embeddings into (--pooled-transport auto, --pooled-ring-slots slots of
    its largest batch, in the wire dtype)."""
    from serving.config import AppArgs

    served = AppArgs()
    return tower_bytes(workload, ring_slots=served.pooled_ring_slots, ring_examples=served.pooled_ring_examples,
                       wire_bytes=served.wire_bytes)


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
        tower_bytes=served_tower_bytes(workload),
        reserve=GpuReserve(fraction=args.gpu_reserve_fraction, fixed=args.gpu_reserve),
    )
