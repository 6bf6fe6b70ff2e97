"""``recserve kernels search`` and ``recserve kernels bench``.

    recserve kernels search --op embedding_bag --workload dlrmv2 --dtypes fp16,int8 --batch 512,4096
    recserve kernels search --op interaction --workload dlrmv2 --budget 20
    recserve kernels bench --out bench.json

The search resumes from its graphs under --graph-dir and merges its winners into
kernels/winners/<device-slug>.json (or --winners).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recserve.cli.types import Subcommand


class Search(Subcommand):
    name = "search"
    help = "search kernel configs for a workload's shapes on this GPU"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--op", required=True, choices=["embedding_bag", "interaction"])
        p.add_argument("--workload", required=True, help="bundled name (tiny, criteo-kaggle, dlrmv2) or JSON path")
        p.add_argument("--budget", type=int, default=24, help="evaluated candidates per shape bucket")
        p.add_argument("--patience", type=int, default=8, help="stop a bucket after this many rounds without gain")
        p.add_argument("--dtypes", default="fp32,fp16,bf16,int8,int4", help="comma list of storage dtypes")
        p.add_argument("--batch", default="512,4096", help="comma list of batch sizes (one bucket each)")
        p.add_argument("--graph-dir", type=Path, default=Path("artifacts/kernel_search"))
        p.add_argument("--winners", type=Path, help="winners file (default kernels/winners/<device>.json)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--rows-cap", type=int, default=2_000_000, help="cap table rows of the timing inputs")
        p.add_argument("--time-budget", type=float, default=None,
                       help="seconds: start no bucket or candidate after this (the winners so far are kept)")

    def run(self, args: argparse.Namespace) -> int:
        return search_command(args)


class Bench(Subcommand):
    name = "bench"
    help = "the kernels' benchmark: lookups and interaction vs torch, one table"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", type=Path, help="write the results as JSON here")
        p.add_argument("--only", default="", help="comma list of a,b,dot,dcn,caps (default all but caps)")
        p.add_argument("--rows-cap", type=int, default=4_000_000)

    def run(self, args: argparse.Namespace) -> int:
        return bench_command(args)


class Kernels(Subcommand):
    name = "kernels"
    help = "search and benchmark the GPU kernels"
    verbs = (Search, Bench)


COMMANDS = (Kernels,)


def search_command(args: argparse.Namespace) -> int:
    import time

    import torch

    from kernels.registry import WINNERS_DIR, Winners, capability_files, device_slug
    from kernels.search.evolve import record_winner, run_search
    from kernels.search.problems import problems_for
    from kernels.search.space import prior_seeds
    from kernels.timing import CudaTimer

    if not torch.cuda.is_available():
        print("recserve kernels search: needs a CUDA GPU (winners are per device)")
        return 2
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    device = torch.device("cuda")
    slug = device_slug(device)
    winners_path = args.winners or WINNERS_DIR / f"{slug}.json"
    capability = torch.cuda.get_device_capability(device)
    winners = Winners.load(winners_path)
    winners.meta.update(device=torch.cuda.get_device_name(device), slug=slug, capability=list(capability))
    # extra roots: the Triton winners of every GPU of this compute capability (this one's too)
    priors = [Winners.load(p) for p in capability_files(capability) if p != winners_path]
    cuda_timer = CudaTimer(warmup=3, reps=15, device=device)
    problems = problems_for(args.op, args.workload, dtypes=args.dtypes.split(","),
                            batches=[int(b) for b in args.batch.split(",")], device=device)
    print(f"searching {len(problems)} buckets of {args.op} for {args.workload} on {slug}"
          f" (seeded also from the winners in {[str(w.source.path) for w in priors] or 'no file'})", flush=True)
    for problem in problems:
        if hasattr(problem, "rows_cap"):
            problem.rows_cap = args.rows_cap
    for i, problem in enumerate(problems):
        if deadline is not None and time.monotonic() >= deadline:
            print(f"time budget spent: {len(problems) - i} buckets not searched", flush=True)
            break
        print(f"--- bucket {i + 1}/{len(problems)}", flush=True)
        graph_path = args.graph_dir / slug / f"{problem.op}_{problem.dtype}_{problem.bucket}.json"
        try:
            graph = run_search(problem, graph_path=graph_path, timer=lambda fn, label: cuda_timer(fn),
                               budget=args.budget, patience=args.patience, seed=args.seed,
                               device_name=slug, log=lambda m: print(m, flush=True),
                               extra_seeds=[c for w in [winners, *priors] for c in prior_seeds(w, problem.op, problem.dtype)],
                               deadline=deadline)
        except Exception as e:  # one bucket's failure (e.g. out of memory) must not lose the others
            print(f"bucket {problem.op}/{problem.dtype}/{problem.bucket} failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
            continue
        if graph.evaluated():
            record_winner(winners, graph)
            winners.save(winners_path)  # after every bucket: an interrupted search keeps its winners
        torch.cuda.empty_cache()
    print(f"winners: {winners_path}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from kernels import bench

    argv = ["--only", args.only, "--rows-cap", str(args.rows_cap)]
    if args.out:
        argv += ["--out", str(args.out)]
    return bench.main(argv)
