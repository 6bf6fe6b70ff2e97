"""``recserve teacher score`` and ``recserve synth labels`` (issue 10: distillation from a teacher).

Light module: argparse only at import time."""

from __future__ import annotations

import argparse
import sys


def _time(value: str) -> float:
    """Seconds since the epoch, or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        from datetime import datetime, timezone

        t = datetime.fromisoformat(value)
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="score logged examples with a teacher model (Ray Data)")
    tsub = p.add_subparsers(dest="teacher_command", metavar="COMMAND", required=True)
    s = tsub.add_parser("score", help="score each unique logged example once with a teacher package",
                        description="Read the served-example log, key each example by its features, and score "
                        "each key not yet scored by this teacher version, on Ray Data (an actor pool holding "
                        "the teacher; a GPU per actor when there is one). Reruns resume.")
    s.add_argument("--logs", required=True, action="append", metavar="DIR",
                   help="example log directory or pyarrow URL (repeat for several)")
    s.add_argument("--teacher", required=True, metavar="PACKAGE", help="the teacher's model package")
    s.add_argument("--out", required=True, metavar="DIR", help="where the scores go (directory or pyarrow URL)")
    s.add_argument("--address", default=None, help="an existing Ray cluster (default: a local Ray)")
    s.add_argument("--actors", type=int, default=1, help="teacher actors (default 1)")
    s.add_argument("--batch-size", type=int, default=4096, help="examples per scored batch (and per file)")
    s.add_argument("--device", default="auto", help="cpu, cuda or auto")
    s.add_argument("--snapshot-at", type=_time, default=None, metavar="TIME",
                   help="when the teacher's snapshot was taken (epoch seconds or ISO; default: its manifest's mtime)")
    s.add_argument("--embeddings", action="store_true",
                   help="also write the teacher's pooled embeddings per example (LoopFM)")
    s.set_defaults(handler=run_teacher_score)

    p = sub.add_parser("synth", help="synthetic data for the distillation pipeline")
    ssub = p.add_subparsers(dest="synth_command", metavar="COMMAND", required=True)
    s = ssub.add_parser("labels", help="draw clicks for logged examples from the synthetic world's ground truth")
    s.add_argument("--logs", required=True, metavar="DIR")
    s.add_argument("--out", required=True, metavar="LABELS")
    s.add_argument("--workload", required=True, help="the workload whose ground truth draws the clicks")
    s.add_argument("--world-seed", type=int, default=0, help="seed of the hidden ground truth")
    s.add_argument("--drift", type=float, default=0.0, help="drift of the world, radians per day (0 = static)")
    s.add_argument("--day-zero", type=_time, default=0.0, metavar="TIME", help="day 0 of a drifting world")
    s.add_argument("--seed", type=int, default=0, help="seed of the click draws")
    s.set_defaults(handler=run_synth_labels)


def run_teacher_score(args: argparse.Namespace) -> int:
    from recserve.package import PackageError
    from serving.teacher import score_logs

    try:
        report = score_logs(args.logs, args.teacher, args.out, address=args.address, batch_size=args.batch_size,
                            actors=args.actors, device=args.device, snapshot_at=args.snapshot_at,
                            with_embeddings=args.embeddings)
    except (PackageError, FileNotFoundError, ValueError) as e:
        print(f"recserve teacher score: {e}", file=sys.stderr)
        return 2
    print(f"recserve teacher score: {report}")
    return 0


def run_synth_labels(args: argparse.Namespace) -> int:
    from recserve.distill import draw_labels
    from recserve.workloads import load_workload

    try:
        n = draw_labels(args.logs, args.out, load_workload(args.workload), world_seed=args.world_seed,
                        drift=args.drift, day_zero=args.day_zero, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"recserve synth labels: {e}", file=sys.stderr)
        return 2
    print(f"recserve synth labels: {n:,} examples labelled into {args.out}")
    return 0
