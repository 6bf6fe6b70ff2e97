"""``recserve teacher score``, ``recserve synth labels`` and ``recserve synth ceilings``:
distillation from a teacher.

Light module: argparse only at import time."""

from __future__ import annotations

import argparse
import sys

from recserve.cli.types import Subcommand


def _time(value: str) -> float:
    """Seconds since the epoch, or an ISO date/time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        from datetime import datetime, timezone

        t = datetime.fromisoformat(value)
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


class TeacherScore(Subcommand):
    name = "score"
    help = "score each unique logged example once with a teacher package"
    description = ("Read the served-example log, key each example by its features, and score "
                   "each key not yet scored by this teacher version, on Ray Data (an actor pool holding "
                   "the teacher; a GPU per actor when there is one). Reruns resume.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--logs", required=True, action="append", metavar="DIR",
                       help="example log directory or pyarrow URL (repeat for several)")
        p.add_argument("--teacher", required=True, metavar="PACKAGE", help="the teacher's model package")
        p.add_argument("--out", required=True, metavar="DIR", help="where the scores go (directory or pyarrow URL)")
        p.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="score on the Ray of a running stack: 'stack' for the `recserve serve` of "
                            "this machine (its state file), or a Ray GCS address; default: a Ray of its own")
        p.add_argument("--actors", type=int, default=1, help="teacher actors (default 1)")
        p.add_argument("--batch-size", type=int, default=4096, help="examples per scored batch (and per file)")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
        p.add_argument("--snapshot-at", type=_time, default=None, metavar="TIME",
                       help="when the teacher's snapshot was taken (epoch seconds or ISO; default: its manifest's mtime)")
        p.add_argument("--embeddings", action="store_true",
                       help="also write the teacher's pooled embeddings per example (LoopFM)")

    def run(self, args: argparse.Namespace) -> int:
        return run_teacher_score(args)


class Teacher(Subcommand):
    name = "teacher"
    help = "score logged examples with a teacher model (Ray Data)"
    verbs = (TeacherScore,)


class SynthLabels(Subcommand):
    name = "labels"
    help = "draw clicks for logged examples from the synthetic world's ground truth"
    description = ("Labels each logged example with a click drawn from a synthetic world's truth on the day it was "
                   "served (days counted from --day-zero). --world click: one click model (ClickModel), --drift "
                   "radians a day. --world exfm: the ExFM world (recserve synth ceilings), whose verticals have "
                   "their own click rates and item weights and whose drift moves the bias and the logit scale; "
                   "the log is one vertical's traffic (--vertical), and its days must fall 0 to 1000 days after "
                   "--day-zero.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--logs", required=True, metavar="DIR")
        p.add_argument("--out", required=True, metavar="LABELS")
        p.add_argument("--workload", required=True, help="the workload whose ground truth draws the clicks")
        p.add_argument("--world", choices=("click", "exfm"), default="click",
                       help="click: the single click model (default); exfm: the ExFM world's verticals")
        p.add_argument("--vertical", default=None, metavar="NAME",
                       help="--world exfm: the vertical whose traffic the log holds (v0-typical, v1-low, v2-high "
                            "or 0, 1, 2)")
        p.add_argument("--world-seed", type=int, default=0, help="seed of the hidden ground truth")
        p.add_argument("--drift", type=float, default=0.0,
                       help="--world click: drift, radians per day (0 = static)")
        p.add_argument("--day-zero", type=_time, default=0.0, metavar="TIME",
                       help="day 0 of a drifting world (epoch seconds or ISO date; default the epoch)")
        p.add_argument("--seed", type=int, default=0, help="seed of the click draws")

    def run(self, args: argparse.Namespace) -> int:
        return run_synth_labels(args)


class SynthCeilings(Subcommand):
    name = "ceilings"
    help = "the ExFM world's power check: what an auxiliary head and a student adapter could at best gain, per vertical"
    description = ("Scores each vertical's fresh traffic with the best pooled teacher there is (the share-weighted "
                   "truth of its snapshot's day, no vertical id), then recalibrates it per vertical without and with "
                   "the snapshot's age; prints NE against the true probabilities.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--workload", default="tiny")
        p.add_argument("--world-seed", type=int, nargs="+", default=[0])
        p.add_argument("--examples", type=int, default=20_000, help="examples a day per vertical")
        p.add_argument("--snapshot-every", type=int, default=3, help="days between teacher snapshots")
        p.add_argument("--delay", type=float, default=1.0, help="days from a snapshot's data end to its publication")
        p.add_argument("--first-day", type=int, default=9)
        p.add_argument("--days", type=int, default=4)
        p.add_argument("--rotation", type=float, help="the world's rotation, radians a day (default: ExFMWorld's)")
        p.add_argument("--bias-trend", type=float, help="the world's bias trend, logit a day (default: ExFMWorld's)")
        p.add_argument("--scale-trend", type=float,
                       help="the world's logit-scale trend, log of the scale a day (default: ExFMWorld's)")

    def run(self, args: argparse.Namespace) -> int:
        return run_synth_ceilings(args)


class Synth(Subcommand):
    name = "synth"
    help = "synthetic data for the distillation pipeline"
    verbs = (SynthLabels, SynthCeilings)


COMMANDS = (Teacher, Synth)


def run_teacher_score(args: argparse.Namespace) -> int:
    from recserve.package import PackageError
    from serving.ops.attach import AttachError, stack_address
    from serving.ops.state import StackNotFound
    from serving.teacher import score_logs

    try:
        address = stack_address() if args.address == "stack" else args.address
        report = score_logs(args.logs, args.teacher, args.out, address=address, batch_size=args.batch_size,
                            actors=args.actors, device=args.device, snapshot_at=args.snapshot_at,
                            with_embeddings=args.embeddings)
    except (PackageError, FileNotFoundError, ValueError, AttachError, StackNotFound) as e:
        print(f"recserve teacher score: {e}", file=sys.stderr)
        return 2
    print(f"recserve teacher score: {report}")
    return 0


def run_synth_ceilings(args: argparse.Namespace) -> int:
    from recserve.synth import ExFMWorld, world_ceilings
    from recserve.workloads import load_workload

    drift = {k: getattr(args, k) for k in ("rotation", "bias_trend", "scale_trend") if getattr(args, k) is not None}
    try:
        workload = load_workload(args.workload)
        rows = [(seed, c) for seed in args.world_seed for c in world_ceilings(
            ExFMWorld(workload, seed=seed, **drift), snapshot_every=args.snapshot_every, delay=args.delay,
            first_day=args.first_day, days=args.days, n=args.examples)]
    except (FileNotFoundError, ValueError) as e:
        print(f"recserve synth ceilings: {e}", file=sys.stderr)
        return 2
    print(f"{'seed':>4} {'vertical':12} {'raw':>7} {'recal':>7} {'+age':>7} {'fresh':>7} {'truth':>7} "
          f"{'AH ceil':>8} {'SA ceil':>8} {'age part':>8}")
    for seed, c in rows:
        print(f"{seed:>4} {c['vertical']:12} {c['teacher_raw']:7.4f} {c['recalibrated']:7.4f} "
              f"{c['recalibrated_with_age']:7.4f} {c['fresh_recalibrated']:7.4f} {c['truth']:7.4f} "
              f"{c['ah_ceiling']:+8.4f} {c['sa_ceiling']:+8.4f} {c['sa_age_part']:+8.4f}")
    print("NE against the true click probabilities; ceilings = raw stale teacher minus recalibrated per vertical "
          "(AH), and minus recalibrated with the snapshot's age too (SA)")
    return 0


def run_synth_labels(args: argparse.Namespace) -> int:
    from recserve.distill import draw_labels
    from recserve.workloads import load_workload

    if (args.world == "exfm") != (args.vertical is not None):
        print("recserve synth labels: --vertical: " + ("required with --world exfm" if args.world == "exfm"
                                                       else "only with --world exfm"), file=sys.stderr)
        return 2
    if args.world == "exfm" and args.drift:
        print("recserve synth labels: --drift: only with --world click (the ExFM world has its own drift)",
              file=sys.stderr)
        return 2
    try:
        r = draw_labels(args.logs, args.out, load_workload(args.workload), world_seed=args.world_seed,
                        drift=args.drift, day_zero=args.day_zero, seed=args.seed, vertical=args.vertical)
    except (FileNotFoundError, ValueError) as e:
        print(f"recserve synth labels: {e}", file=sys.stderr)
        return 2
    world = f"the ExFM world's vertical {args.vertical}" if args.vertical is not None else "the click model"
    print(f"recserve synth labels: {r.examples:,} examples labelled by {world} on days {r.first_day} to "
          f"{r.last_day} into {args.out}")
    return 0
