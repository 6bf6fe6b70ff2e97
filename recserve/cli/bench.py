"""``recserve bench``: the monolith vs the sharded stack on one trace (see loadtest/bench.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recserve.cli.types import Subcommand


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--serve-env: expected KEY=VALUE, got {text!r}")
    return key, value


class Bench(Subcommand):
    name = "bench"
    help = "benchmark the monolithic server against the sharded Ray Serve stack"
    description = ("Replays one seeded trace open-loop at fixed offered rates (and closed-loop for "
                   "maximum throughput) against each configuration; writes bench.csv, p99.png and "
                   "table.md to --out. Traffic only to 127.0.0.1.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--workload", default="criteo-kaggle", help="bundled name or a workload JSON file")
        p.add_argument("--max-rows", type=int, default=100_000, help="cap every table (0 = full size)")
        p.add_argument(
            "--configs",
            type=_names,
            default=None,
            help="comma-separated: monolith and/or STRATEGY-SHARDS (default: monolith and "
            "singular/table/capacity/load at --shard-counts)",
        )
        p.add_argument("--shard-counts", type=_floats, default=(1, 2, 4), help="for the default configs (1,2,4)")
        p.add_argument("--rates", type=_floats, default=(50, 100, 200), help="offered requests/s, comma-separated")
        p.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
        p.add_argument("--max-requests", type=int, default=20_000, help="cap per run")
        p.add_argument("--closed-concurrency", type=int, default=8, help="closed-loop workers (0: skip)")
        p.add_argument("--trace-size", type=int, default=2_000, help="distinct requests in the trace")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--timeout", type=float, default=5.0, help="per-request deadline, seconds")
        p.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
        p.add_argument("--warmup", type=int, default=50, help="requests sent before measuring")
        p.add_argument("--idle-seconds", type=float, default=5.0,
                       help="seconds the servers' CPU is read with no requests before the runs (printed per "
                       "process; the table's 'of it idle' is that rate's share of each run's CPU per request; 0: skip)")
        p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4"))
        p.add_argument("--shard-memory", default=None, help="per-shard cap for export (e.g. 8MiB)")
        p.add_argument("--train-steps", type=int, default=200)
        p.add_argument("--artifacts", type=Path, default=Path("artifacts/bench"), help="trained model and packages")
        p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="CSV, plot, tables, logs")
        p.add_argument(
            "--serve-env", type=_env, action="append", default=[],
            help="KEY=VALUE for the Ray Serve stack, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (repeatable)",
        )  # fmt: skip
        p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `recserve serve`")
        p.add_argument("--device", default="cpu", help="torch device of the servers (cpu, cuda): the monolith, "
                       "shards and tower; with --init random also where the weights are drawn")
        p.add_argument("--init", choices=("trained", "random"), default="trained",
                       help="packages from a trained model (recserve train; needs torchrec) or seeded random "
                       "weights (recserve export --init random; no torchrec: GPU hosts)")
        p.add_argument("--discard-packages", action="store_true",
                       help="delete each package after its configuration ran (full-size packages on a small disk; "
                       "--init random packages are rebuilt in a minute)")
        g = p.add_argument_group("engine-only mode (--engine)")
        g.add_argument("--engine", action="store_true",
                       help="no servers: the shard and tower cores in this process, no RPC, large batches; "
                       "writes engine.md/engine.json to --out")
        g.add_argument("--package", type=Path, default=None,
                       help="--engine: this package (default: a one-shard package of --workload/--dtype, "
                       "exported with --init)")
        g.add_argument("--batch-sizes", type=_ints, default=(1024, 4096, 16384, 65536), help="--engine: examples per batch")
        g.add_argument("--output-dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                       help="--engine: the shards' pooled-embedding dtype")
        g.add_argument("--tower-dtype", default="float16", choices=("float32", "float16", "bfloat16"),
                       help="--engine: the tower's compute dtype")
        g.add_argument("--engine-seconds", type=float, default=2.0, help="--engine: seconds timed per figure and size")

    def run(self, args: argparse.Namespace) -> int:
        return run_bench_command(args)


COMMANDS = (Bench,)


def run_bench_command(args: argparse.Namespace) -> int:
    from loadtest.bench import BenchError, BenchOptions, default_configs, monolith_package, run_bench
    from loadtest.engine import EngineError
    from loadtest.targets import TargetError

    try:
        opts = BenchOptions(
            workload=args.workload,
            max_rows=args.max_rows or None,
            configs=args.configs or default_configs(tuple(int(n) for n in args.shard_counts)),
            rates=args.rates,
            duration_s=args.duration,
            max_requests=args.max_requests,
            closed_concurrency=args.closed_concurrency,
            trace_size=args.trace_size,
            seed=args.seed,
            timeout_s=args.timeout,
            arrivals=args.arrivals,
            warmup_requests=args.warmup,
            dtype=args.dtype,
            shard_memory=args.shard_memory,
            train_steps=args.train_steps,
            artifacts=args.artifacts,
            out_dir=args.out,
            serve_env=tuple(args.serve_env),
            serve_args=tuple(args.serve_arg),
            device=args.device,
            init=args.init,
            discard_packages=args.discard_packages,
            idle_s=args.idle_seconds,
        )
        if args.engine:
            from loadtest.engine import EngineOptions, run_engine

            package = args.package or monolith_package(opts)
            run_engine(EngineOptions(package=package, device=args.device, batch_sizes=args.batch_sizes,
                                     output_dtype=args.output_dtype, tower_dtype=args.tower_dtype,
                                     seconds=args.engine_seconds, seed=args.seed, out_dir=args.out))
        else:
            run_bench(opts)
    except (BenchError, TargetError, EngineError) as e:
        print(f"recserve bench: {e}", file=sys.stderr)
        return 2
    return 0
