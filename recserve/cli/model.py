"""``recserve train``, ``recserve export``, ``recserve default-package`` and ``recserve inspect``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from recserve.cli.types import Subcommand


def _add_workload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True, help="bundled name (tiny, criteo-kaggle, dlrmv2) or a JSON file")
    p.add_argument("--max-rows", type=int, default=None, help="cap every table at this many rows")


class Train(Subcommand):
    name = "train"
    help = "train a workload's torchrec model on synthetic clicks"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _add_workload(p)
        p.add_argument("--out", required=True, type=Path, help="where to save the state dict (.pt)")
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        g = p.add_argument_group("students trained on logged examples (distillation)")
        g.add_argument("--labels", default=None, metavar="LABELS",
                       help="labelled logged examples (recserve synth labels): train on them instead of fresh traffic")
        g.add_argument("--distill", default=None, metavar="SCORES", help="teacher scores (recserve teacher score)")
        g.add_argument("--aux-weight", type=float, default=1.0, metavar="A",
                       help="weight of the teacher's loss (0 = the student without the teacher)")
        g.add_argument("--label-scale", type=float, default=1.0, metavar="S",
                       help="the teacher's target is min(1, S x its probability) (default 1)")
        g.add_argument("--grad-scale", type=float, default=1.0, metavar="G",
                       help="the auxiliary head's gradient into the shared layers is multiplied by G "
                            "(0 = the teacher trains the auxiliary tower only; default 1)")
        g.add_argument("--aux-tower", type=_widths, default=None, metavar="W1,W2",
                       help="hidden widths of the auxiliary head's tower ('' = one linear layer; default: those of "
                            "the serving tower)")
        g.add_argument("--adapter", choices=("mlp", "affine", "none"), default="mlp",
                       help="student adapter of the teacher's logit and age (none = no adapter)")
        g.add_argument("--adapter-weight", type=float, default=None, metavar="A",
                       help="loss weight of the adapter's target (default: --aux-weight)")
        g.add_argument("--adapter-lr", type=float, default=0.01, help="the adapter's learning rate (default 0.01)")
        g.add_argument("--distill-head", choices=("aux", "main"), default="aux",
                       help="the head that takes the teacher's supervision (main = the plain-distillation baseline)")
        g.add_argument("--epochs", type=int, default=1, help="passes over --labels")

    def run(self, args: argparse.Namespace) -> int:
        return run_train(args)


def _widths(value: str) -> tuple[int, ...]:
    """'64,32' -> (64, 32); '' -> ()."""
    try:
        widths = tuple(int(w) for w in value.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated widths: {value!r}") from None
    if any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive: {value!r}")
    return widths


class Export(Subcommand):
    name = "export"
    help = "write a sharded model package from a trained state dict, or with seeded random weights"
    description = (
        "Writes a model package: from a trained torchrec state dict (--state-dict), or with "
        "seeded random weights (--init random --seed S: torchrec's and torch's own "
        "initialization; no training, no torchrec), streamed chunk by chunk of rows on "
        "--threads threads. Prints a line per table and shard, then the time, GB/s and peak RSS."
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        _add_workload(p)
        p.add_argument("--state-dict", type=Path, help="the trained model (what `recserve train` saves)")
        p.add_argument("--init", choices=("trained", "random"), default="trained",
                       help="trained: from --state-dict (default); random: seeded random weights")
        p.add_argument("--seed", type=int, default=0, help="--init random: the seed of every weight")
        p.add_argument("--gen-device", default="cpu",
                       help="--init random: where to draw and convert the rows (cpu, cuda, cuda:1)")
        p.add_argument("--threads", type=int, default=None, help="conversion threads (default: every core)")
        p.add_argument("--out", required=True, type=Path, help="package directory to create")
        p.add_argument("--strategy", default="table", choices=("singular", "table", "capacity", "load"))
        p.add_argument("--shards", type=int, default=1)
        p.add_argument("--shard-memory", default=None, help="per-shard cap: bytes or 512MiB, 2GiB, 1GB")
        p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16", "int8", "int4"))
        p.add_argument("--name", default=None, help="model name (default: the workload's; W-random for --init random)")
        p.add_argument("--model-version", default=None, help="model version (default: a content hash)")
        p.add_argument("--drop-features", default="", help="comma-separated features whose tables are left out")
        p.add_argument("--force", action="store_true", help="replace --out if it exists")

    def run(self, args: argparse.Namespace) -> int:
        return run_export(args)


class DefaultPackage(Subcommand):
    name = "default-package"
    help = "train and export the default model into artifacts/default (what `make serve` runs first)"
    description = ("Trains criteo-kaggle (tables capped at 100k rows, ~15 s) and exports it into "
                   "artifacts/default ($RECSERVE_ARTIFACTS/default), the package `recserve serve` serves by "
                   "default. Does nothing if it is there.")

    def run(self, args: argparse.Namespace) -> int:
        return run_default_package(args)


class Inspect(Subcommand):
    name = "inspect"
    help = "verify a model package and print its tables and shards"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("package", type=Path)

    def run(self, args: argparse.Namespace) -> int:
        return run_inspect(args)


COMMANDS = (Train, Export, DefaultPackage, Inspect)


def run_train(args: argparse.Namespace) -> int:
    from recserve.train import train
    from recserve.workloads import load_workload

    workload = load_workload(args.workload).with_max_rows(args.max_rows)
    if args.distill and not args.labels:
        print("recserve train: --distill needs --labels (the labelled examples the scores are joined to)",
              file=sys.stderr)
        return 2
    unused = [flag for flag, value, default in (("--label-scale", args.label_scale, 1.0),
                                                ("--grad-scale", args.grad_scale, 1.0),
                                                ("--aux-tower", args.aux_tower, None),
                                                ("--adapter-weight", args.adapter_weight, None),
                                                ("--adapter-lr", args.adapter_lr, 0.01)) if value != default]
    if unused and not args.distill:
        print(f"recserve train: {', '.join(unused)}: only with --distill (the teacher's scores)", file=sys.stderr)
        return 2
    if args.labels:
        from recserve.distill import DistillConfig, load_training_set, train_student

        try:
            config = DistillConfig(aux_weight=args.aux_weight if args.distill else 0.0, adapter=args.adapter,
                                   distill_head=args.distill_head, label_scale=args.label_scale,
                                   grad_scale=args.grad_scale, aux_tower=args.aux_tower,
                                   adapter_weight=args.adapter_weight, adapter_lr=args.adapter_lr)
            data = load_training_set(args.labels, args.distill, workload.features)
        except (ValueError, FileNotFoundError) as e:
            print(f"recserve train: {e}", file=sys.stderr)
            return 2
        r = train_student(workload, data, args.out, config, epochs=args.epochs, batch_size=args.batch_size,
                          seed=args.seed)
        print(f"{workload.name} student: {r.setup}")
        print(f"trained {workload.name} on {r.examples:,} logged examples ({r.with_teacher:,} with a teacher score): "
              f"{r.steps} steps in {r.seconds:.1f}s; last loss {r.last_loss}; saved {r.path} (main head only)")
        return 0
    r = train(workload, args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(f"trained {workload.name}: {r.steps} steps in {r.seconds:.1f}s")
    print(f"held-out AUC {r.auc:.4f} (ground truth's own AUC {r.oracle_auc:.4f}); saved {r.path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.init == "random" and args.state_dict:
        return _export_usage("--state-dict: not used with --init random (drop one of them)")
    if args.init == "trained" and not args.state_dict:
        return _export_usage("--state-dict: required (or --init random for seeded random weights)")
    from recserve.export import export_package
    from recserve.package import PackageError
    from recserve.planning import parse_bytes, table_specs
    from recserve.random_init import export_random_package
    from recserve.workloads import load_workload
    from sharding import PlannerError, plan

    workload = load_workload(args.workload).with_max_rows(args.max_rows)
    dropped = tuple(f for f in args.drop_features.split(",") if f)
    try:
        unknown = sorted(set(dropped) - set(workload.features))
        if unknown:
            raise ValueError(f"--drop-features: unknown feature(s) {unknown}")
        kept = {t.name for t in workload.tables_without(dropped)}
        plan_ = plan(
            [s for s in table_specs(workload, args.dtype) if s.name in kept],
            strategy=args.strategy,
            num_shards=args.shards,
            shard_memory=parse_bytes(args.shard_memory) if args.shard_memory else None,
        )
        print(plan_)
        common = dict(plan=plan_, name=args.name, version=args.model_version, dropped_features=dropped,
                      overwrite=args.force, threads=args.threads)
        if args.init == "random":
            r = export_random_package(workload, args.out, seed=args.seed, gen_device=args.gen_device, **common)
        else:
            r = export_package(workload, args.state_dict, args.out, **common)
    except (PlannerError, PackageError, ValueError) as e:
        print(f"recserve export: {e}", file=sys.stderr)
        return 2
    print(r.summary())
    print(f"total {time.perf_counter() - t0:.1f}s (this command: imports, plan, dense and tables)")
    return 0


def run_default_package(args: argparse.Namespace) -> int:
    from recserve.default_package import build_default_package, default_package_dir, is_built

    if is_built():
        print(f"recserve: the default package is there: {default_package_dir()}")
        return 0
    print(f"recserve: default package: {build_default_package()}")
    return 0


def _export_usage(message: str) -> int:
    print(f"recserve export: {message}", file=sys.stderr)
    return 2


def run_inspect(args: argparse.Namespace) -> int:
    from recserve.package import ModelPackage, PackageError

    try:
        pkg = ModelPackage.open(args.package)
        pkg.verify()
    except PackageError as e:
        print(f"recserve inspect: {args.package}: {e}", file=sys.stderr)
        return 1
    print(pkg.describe())
    print("ok: checksums, manifest schema and tensor shapes verified")
    return 0
