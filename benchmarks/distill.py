"""Does a stale teacher help fresh students? ExFM's auxiliary head and student adapter,
end to end through the real pipeline, in a drifting synthetic world.

    world     tiny's features; the ground truth drifts (affinities and dense weights rotate by
              --drift radians a day) and the hot ids move every day (new ids)
    teacher   dcnv2, wider tables and MLPs, trained on days [0, T) (a long history), exported as a
              package; its snapshot is --gap days older than the students' first day
    students  two small dlrm workloads (A: tiny's shape; B: half the embedding width), each
              serving its own traffic on days [T + gap, T + gap + S) (the recent days only)
    pipeline  served examples logged by serving/example_log.py -> one `recserve teacher score`
              job (Ray Data) over both students' logs -> `recserve synth labels` -> students
    eval      the next day's traffic (day T + gap + S), main head only (what a package serves)

For every seed: NE (normalized entropy, lower is better) and AUC of the teacher, and of each
student trained five ways: alone; plain distillation on the main head; auxiliary head
(adapter none); auxiliary head + affine adapter; auxiliary head + mlp adapter.

    .venv/bin/python benchmarks/distill.py --out benchmarks/results/distill
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recserve.batch import Bags, Batch  # noqa: E402
from recserve.distill import DistillConfig, TrainingSet, load_training_set, train_student, draw_labels  # noqa: E402
from recserve.model import build_model, predict  # noqa: E402
from recserve.synth import ClickModel, TrafficGenerator  # noqa: E402
from recserve.train import auc, normalized_entropy  # noqa: E402
from recserve.workloads import WorkloadConfig, load_workload  # noqa: E402

DAY_ZERO = 1_800_000_000.0  # the world's day 0, seconds since the epoch
DAY = 86_400.0

VARIANTS = {  # name -> DistillConfig (None = no teacher)
    "student alone": DistillConfig(aux_weight=0.0, adapter="none"),
    "distill on main head": DistillConfig(aux_weight=1.0, adapter="none", distill_head="main"),
    "aux head": DistillConfig(aux_weight=1.0, adapter="none"),
    "aux head + affine adapter": DistillConfig(aux_weight=1.0, adapter="affine"),
    "aux head + mlp adapter": DistillConfig(aux_weight=1.0, adapter="mlp"),
}


def workloads() -> tuple[WorkloadConfig, WorkloadConfig, dict[str, WorkloadConfig]]:
    """(world, teacher, students) built from tiny (same features: one ground truth for all)."""
    world = load_workload("tiny")
    wide = tuple(dataclasses.replace(t, dim=16) for t in world.tables)
    teacher = dataclasses.replace(world, name="teacher-dcn", interaction="dcnv2", tables=wide,
                                  bottom_mlp=(32, 16), top_mlp=(64, 32, 1), dcn_layers=2, dcn_low_rank=8)
    narrow = tuple(dataclasses.replace(t, dim=4) for t in world.tables)
    students = {"student-a": dataclasses.replace(world, name="student-a"),
                "student-b": dataclasses.replace(world, name="student-b", tables=narrow, bottom_mlp=(8, 4),
                                                 top_mlp=(8, 1))}
    return world, teacher, students


def concat(batches: list[Batch]) -> Batch:
    sparse = {}
    for f in batches[0].sparse:
        parts = [b.sparse[f] for b in batches]
        sparse[f] = Bags(np.concatenate([p.values for p in parts]), np.concatenate([p.lengths for p in parts]))
    units = np.concatenate([b.unit_ids for b in batches])
    return Batch(np.concatenate([b.dense for b in batches]), sparse, units)


def traffic(world: WorkloadConfig, day: int, n: int, seed: int, args) -> Batch:
    """Day ``day``'s traffic: --new-ids of the id draws land on ids moved by day x --id-shift."""
    return TrafficGenerator(world, seed=seed * 1000 + day, id_shift=day * args.id_shift,
                            shifted_fraction=args.new_ids).batch(n)


def evaluate(model_state: dict, workload: WorkloadConfig, batch: Batch, labels: np.ndarray) -> tuple[float, float]:
    m = build_model(workload)
    m.load_state_dict(model_state)
    p = predict(m.eval(), batch, workload.features)
    return normalized_entropy(labels, p), auc(labels, p)


def run_seed(seed: int, args, work: Path) -> list[dict]:
    from recserve.export import export_package
    from recserve.planning import plan_workload
    from serving.teacher import score_logs
    from serving.example_log import ExampleLog, ExampleLogConfig

    world, teacher_w, students = workloads()
    truth = ClickModel(world, seed=seed, drift=args.drift)
    rng = np.random.default_rng(seed)
    t_end = args.history_days
    first = t_end + args.gap_days
    eval_day = first + args.student_days
    out = work / f"seed-{seed}"
    rows = []

    # the teacher: a long history, days [0, t_end)
    t0 = time.perf_counter()
    days = [traffic(world, d, args.teacher_per_day, seed, args) for d in range(t_end)]
    labels = np.concatenate([truth.at(d).labels(b, rng) for d, b in enumerate(days)])
    history = concat(days)
    n = history.batch_size
    data = TrainingSet(batch=history, labels=labels, teacher=np.zeros(n, np.float32), has_teacher=np.zeros(n, bool),
                       age_days=np.zeros(n, np.float32))
    train_student(teacher_w, data, out / "teacher.pt", DistillConfig(aux_weight=0.0, adapter="none"),
                  epochs=args.teacher_epochs, seed=seed, progress=False)
    pkg = export_package(teacher_w, out / "teacher.pt", out / "teacher-pkg", progress=False,
                         plan=plan_workload(teacher_w, strategy="singular", num_shards=1)).path
    teacher_s = time.perf_counter() - t0

    # the students' recent traffic, served and logged (one log per student)
    for i, name in enumerate(students):
        now = [0.0]
        log = ExampleLog(ExampleLogConfig(rate=1.0, log_dir=str(out / "logs" / name), rows_per_file=50_000),
                         model=name, version="v0", features=world.features, clock=lambda: now[0])
        for d in range(first, eval_day):
            b = traffic(world, d, args.student_per_day, seed + 100 * (i + 1), args)
            for k, start in enumerate(range(0, b.batch_size, 64)):
                now[0] = DAY_ZERO + d * DAY + k
                part = b.slice(start, min(start + 64, b.batch_size))
                while not log.submit(f"{name}-{d}-{k}", part, np.zeros(part.batch_size, np.float32)):
                    time.sleep(0.01)  # this simulation wants every example
        log.close()

    # one teacher scoring job over both logs (Ray Data), then clicks for the logged examples
    t0 = time.perf_counter()
    report = score_logs([str(out / "logs" / s) for s in students], str(pkg), str(out / "scores"),
                        snapshot_at=DAY_ZERO + t_end * DAY)
    score_s = time.perf_counter() - t0
    print(f"seed {seed}: teacher trained in {teacher_s:.0f}s; scoring: {report}", flush=True)

    ev_batch = traffic(world, eval_day, args.eval_examples, seed + 7, args)
    ev_labels = truth.at(eval_day).labels(ev_batch, np.random.default_rng(seed + 8))
    ne, a = evaluate(torch.load(out / "teacher.pt", weights_only=True), teacher_w, ev_batch, ev_labels)
    oracle = truth.at(eval_day).logits(ev_batch)
    rows.append(dict(seed=seed, student="-", variant="teacher (stale)", ne=ne, auc=a))
    print(f"  {'teacher':10s} {'(stale)':28s} NE {ne:.4f}  AUC {a:.4f}", flush=True)
    rows.append(dict(seed=seed, student="-", variant="ground truth (ceiling)",
                     ne=normalized_entropy(ev_labels, 1 / (1 + np.exp(-oracle))), auc=auc(ev_labels, oracle)))
    for i, (name, w) in enumerate(students.items()):
        draw_labels(str(out / "logs" / name), str(out / "labels" / name), world, world_seed=seed, drift=args.drift,
                    day_zero=DAY_ZERO, seed=seed + 11 * (i + 1))
        data = load_training_set(str(out / "labels" / name), str(out / "scores"), w.features)
        for variant, cfg in VARIANTS.items():
            path = out / f"{name}-{variant.replace(' ', '_')}.pt"
            train_student(w, data, path, cfg, epochs=args.student_epochs, seed=seed, progress=False)
            ne, a = evaluate(torch.load(path, weights_only=True), w, ev_batch, ev_labels)
            rows.append(dict(seed=seed, student=name, variant=variant, ne=ne, auc=a))
            print(f"  {name:10s} {variant:28s} NE {ne:.4f}  AUC {a:.4f}", flush=True)
    rows.append(dict(seed=seed, student="-", variant="_timing", teacher_train_s=teacher_s, score_s=score_s,
                     scored=report.scored, logged=report.examples))
    return rows


def table(rows: list[dict]) -> str:
    keys = []
    for r in rows:
        k = (r["student"], r["variant"])
        if r["variant"] != "_timing" and k not in keys:
            keys.append(k)
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| student | variant | NE mean ± sd | AUC mean ± sd | NE vs alone (per-seed mean) |",
             "|---|---|---|---|---|"]
    for student, variant in keys:
        mine = [r for r in rows if (r["student"], r["variant"]) == (student, variant)]
        ne = np.array([r["ne"] for r in mine])
        au = np.array([r["auc"] for r in mine])
        delta = ""
        if student != "-":
            alone = {r["seed"]: r["ne"] for r in rows if (r["student"], r["variant"]) == (student, "student alone")}
            d = np.array([r["ne"] - alone[r["seed"]] for r in mine])
            delta = f"{d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0:.4f}"
        lines.append(f"| {student} | {variant} | {ne.mean():.4f} ± {ne.std(ddof=1) if len(ne) > 1 else 0:.4f} | "
                     f"{au.mean():.4f} ± {au.std(ddof=1) if len(au) > 1 else 0:.4f} | {delta} |")
    lines.append(f"\n{len(seeds)} seeds ({', '.join(map(str, seeds))}); ± is the sample standard deviation over seeds.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--drift", type=float, default=0.06, help="radians per day")
    p.add_argument("--id-shift", type=int, default=97, help="moved ids move by this much per day")
    p.add_argument("--new-ids", type=float, default=0.3, help="fraction of id draws that land on moved ids")
    p.add_argument("--history-days", type=int, default=8)
    p.add_argument("--gap-days", type=int, default=2)
    p.add_argument("--student-days", type=int, default=2)
    p.add_argument("--teacher-per-day", type=int, default=10_000)
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--student-per-day", type=int, default=2_000)
    p.add_argument("--student-epochs", type=int, default=2)
    p.add_argument("--eval-examples", type=int, default=10_000)
    args = p.parse_args()

    import tempfile

    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="recserve-distill-"))
    rows = []
    try:
        for seed in args.seeds:
            rows += run_seed(seed, args, work)
    finally:
        ray.shutdown()
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "run.json").write_text(json.dumps(dict(args={k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in vars(args).items()},
                                                       seconds=time.perf_counter() - started, rows=rows), indent=1))
    print(text)
    print(f"total {time.perf_counter() - started:.0f}s; written {args.out}/table.md and run.json")


if __name__ == "__main__":
    main()
