"""Does a stale, pooled teacher help per-vertical students, and do ExFM's auxiliary head (AH)
and student adapter (SA) fix what it gets wrong? (issue 20)

    world     recserve.synth.ExFMWorld on tiny's features: 3 verticals (v0-typical; v1-low: click
              rate -1.2 logit, item weight x0.2; v2-high: +0.9, x1.8); drift: rotation, a bias trend
              and a logit-scale trend
    teacher   a dcnv2 (16-wide tables) trained on pooled traffic of days 0-5 without the vertical
              id, fine-tuned every 3 days on the new days (snapshots trained through days 5, 8, 11,
              each published a day later), exported as a package and scored in-process by
              LocalRanker (the Ray Data job's code path; tests/recserve/test_teacher.py checks that
              the job's scores equal these); each example is scored by the newest snapshot at its
              log time, so its age is 1 to 4 days
    students  one tiny dlrm per vertical, one pass over days 9-12 of fresh traffic of its vertical
              (--student-per-day a day), batch 512
    eval      day 13 (a fresh draw), serving tower only, NE against sampled labels and against the
              true click probabilities; AH's knobs are tuned on a validation draw of day 13

Variants: alone; distillation on the serving head (main); AH; AH tuned (loss weight, gradient
scale, label scale: the best of a grid on the validation draw, init 0); AH + SA; main + SA.
Each seed is a new world, teacher and traffic; each student is trained from two inits, and each
variant is paired with "alone" of the same init. The noise floor is alone(init 1) - alone(init 0).

    nice -n 10 .venv/bin/python benchmarks/distill.py --out benchmarks/results/distill
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recserve.batch import Bags, Batch  # noqa: E402
from recserve.distill import DistillConfig, StudentAdapter, TrainingSet, train_student  # noqa: E402
from recserve.model import predict  # noqa: E402
from recserve.synth import ExFMWorld, cross_entropy_ne, snapshot_of, world_ceilings  # noqa: E402
from recserve.train import auc, normalized_entropy  # noqa: E402
from recserve.workloads import WorkloadConfig, load_workload  # noqa: E402

# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy here); between two
# listed ones the smaller df's (wider) value is used.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 22: 2.074, 24: 2.064, 26: 2.056, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000,
       120: 1.980}


def t95(df: int) -> float:
    return T95[max(k for k in T95 if k <= df)]


ALONE = DistillConfig(aux_weight=0.0, adapter="none")
VARIANTS = {
    "main": DistillConfig(aux_weight=1.0, adapter="none", distill_head="main"),
    "AH": DistillConfig(aux_weight=1.0, adapter="none"),
    # AH+SA's two targets weigh 1 + 1: AH at weight 2 is AH+SA with the adapter frozen at the
    # identity, the control that tells the adapter's correction from the added teacher weight
    "AH x2": DistillConfig(aux_weight=2.0, adapter="none"),
    "AH+SA": DistillConfig(aux_weight=1.0, adapter="affine"),
    "main+SA": DistillConfig(aux_weight=1.0, adapter="affine", distill_head="main"),
}
AH_GRID = [dict(aux_weight=w, grad_scale=g, label_scale=ls)
           for w, g, ls in [(1, 1, 1), (0.3, 1, 1), (3, 1, 1), (1, 0.3, 1), (1, 3, 1), (1, 1, 0.8)]]


def workloads() -> tuple[WorkloadConfig, WorkloadConfig]:
    """(student, teacher): tiny, and a wider dcnv2 on the same features."""
    student = load_workload("tiny")
    wide = tuple(dataclasses.replace(t, dim=16) for t in student.tables)
    teacher = dataclasses.replace(student, name="teacher-dcn", interaction="dcnv2", tables=wide,
                                  bottom_mlp=(32, 16), top_mlp=(64, 32, 1), dcn_layers=2, dcn_low_rank=8)
    return student, teacher


def concat(batches: list[Batch]) -> Batch:
    sparse = {f: Bags(np.concatenate([b.sparse[f].values for b in batches]),
                      np.concatenate([b.sparse[f].lengths for b in batches])) for f in batches[0].sparse}
    return Batch(np.concatenate([b.dense for b in batches]), sparse, np.concatenate([b.unit_ids for b in batches]))


def day_set(batch: Batch, labels: np.ndarray, teacher: np.ndarray | None = None, age: np.ndarray | None = None,
            rng: np.random.Generator | None = None) -> TrainingSet:
    n = batch.batch_size
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return TrainingSet(batch=batch.take(order), labels=labels[order].astype(np.float32),
                       teacher=(np.zeros(n, np.float32) if teacher is None else teacher[order].astype(np.float32)),
                       has_teacher=np.full(n, teacher is not None), age_days=(
                           np.zeros(n, np.float32) if age is None else age[order].astype(np.float32)))


class Snapshots:
    """The teacher's snapshots: trained on pooled traffic, fine-tuned every few days, exported,
    scored in-process through LocalRanker."""

    def __init__(self, world: ExFMWorld, workload: WorkloadConfig, args, work: Path, seed: int):
        from recserve.export import export_package
        from recserve.planning import plan_workload
        from serving.engine.in_process_teacher import InProcessTeacher

        self.scorers: dict[int, InProcessTeacher] = {}
        work.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + 5)
        share = world.pooled_share()
        state = None
        ends = list(range(args.first_snapshot, args.eval_day + 1, args.snapshot_every))
        if args.eval_day not in ends:
            ends.append(args.eval_day)  # the fresh teacher of the freshness figure: trained through the day before eval
        start = 0
        for e in sorted(ends):
            sets = []
            for d in range(start, e):
                parts = [world.traffic(v, d, int(args.teacher_per_day * w), stream=1) for v, w in enumerate(share)]
                labels = np.concatenate([world.labels(b, v, d, rng) for v, (b, _) in enumerate(parts)])
                sets.append(day_set(concat([b for b, _ in parts]), labels, rng=rng))
            r = train_student(workload, sets, None, ALONE, seed=seed, batch_size=args.batch_size, progress=False,
                              init=state)
            state = {k: v.detach().clone() for k, v in r.model.state_dict().items()}
            path = work / f"teacher-{e}.pt"
            torch.save(state, path)
            pkg = export_package(workload, path, work / f"teacher-{e}", progress=False, version=f"snap-{e}",
                                 plan=plan_workload(workload, strategy="singular", num_shards=1)).path
            self.scorers[e] = InProcessTeacher(str(pkg))
            start = e

    def score(self, batch: Batch, end: np.ndarray) -> np.ndarray:
        """Each example scored by snapshot ``end`` (its data end), float32 [B]."""
        out = np.empty(batch.batch_size, np.float32)
        for e in np.unique(end):
            rows = np.flatnonzero(end == e)
            out[rows] = self.scorers[int(e)].logits(batch.take(rows))
        return out


def evaluate(model: torch.nn.Module, workload: WorkloadConfig, ev: dict) -> dict:
    p = predict(model, ev["batch"], workload.features)
    return dict(ne=normalized_entropy(ev["labels"], p), ne_true=cross_entropy_ne(ev["probs"], p),
                auc=auc(ev["labels"], p))


def eval_set(world: ExFMWorld, v: int, day: int, n: int, stream: int, teacher: Snapshots, args) -> dict:
    b, times = world.traffic(v, day, n, stream=stream)
    probs = world.probs(b, v, day)
    end, age = snapshot_of(times, snapshot_every=args.snapshot_every, delay=args.delay)
    return dict(batch=b, probs=probs, labels=world.labels(b, v, day, np.random.default_rng(stream * 7 + v)),
                times=times, end=end, age=age, teacher=teacher.score(b, end))


def make_world(workload: WorkloadConfig, seed: int, args) -> ExFMWorld:
    return ExFMWorld(workload, seed=seed, rotation=args.rotation, bias_trend=args.bias_trend,
                     scale_trend=args.scale_trend)


def run_seed(seed: int, args, work: Path, log) -> tuple[list[dict], list[dict], list[dict]]:
    student_w, teacher_w = workloads()
    world = make_world(student_w, seed, args)
    t0 = time.perf_counter()
    teacher = Snapshots(world, teacher_w, args, work / f"seed-{seed}", seed)
    log(f"seed {seed}: teacher snapshots {sorted(teacher.scorers)} in {time.perf_counter() - t0:.0f}s")
    rows, teacher_rows, age_rows = [], [], []
    for v, vert in enumerate(world.verticals):
        rng = np.random.default_rng(seed * 100 + v)
        stream = []
        for d in range(args.eval_day - args.student_days, args.eval_day):
            b, times = world.traffic(v, d, args.student_per_day, stream=0)
            end, age = snapshot_of(times, snapshot_every=args.snapshot_every, delay=args.delay)
            stream.append(day_set(b, world.labels(b, v, d, rng), teacher.score(b, end), age, rng=rng))
        val = eval_set(world, v, args.eval_day, args.eval_examples, 2, teacher, args)
        ev = eval_set(world, v, args.eval_day, args.eval_examples, 3, teacher, args)
        t_ne = dict(ne=normalized_entropy(ev["labels"], 1 / (1 + np.exp(-ev["teacher"]))),
                    ne_true=cross_entropy_ne(ev["probs"], 1 / (1 + np.exp(-ev["teacher"]))))
        teacher_rows.append(dict(seed=seed, vertical=vert.name, **t_ne, truth_ne_true=cross_entropy_ne(ev["probs"], ev["probs"])))

        def train(cfg: DistillConfig, init: int):
            r = train_student(student_w, stream, None, cfg, seed=1000 * init + seed, batch_size=args.batch_size,
                              progress=False)
            return r

        def record(variant: str, init: int, r, extra: dict | None = None) -> dict:
            row = dict(seed=seed, vertical=vert.name, variant=variant, init=init, **evaluate(r.model, student_w, ev),
                       **(extra or {}))
            rows.append(row)
            return row

        for init in range(args.inits):
            record("alone", init, train(ALONE, init))
            for name, cfg in VARIANTS.items():
                if name not in args.variants:
                    continue
                r = train(cfg, init)
                record(name, init, r)
                if name == "AH+SA" and init == 0:  # the freshness figure: raw, SA-corrected and fresh teacher by age
                    age_rows += teacher_by_age(world, v, ev, teacher, r.adapter, args, seed)
            if "AH tuned" not in args.variants:
                best = None
            elif init == 0:
                best, best_val = None, np.inf
                for knobs in AH_GRID:
                    cfg = DistillConfig(adapter="none", **knobs)
                    r = train(cfg, 0)
                    val_ne = evaluate(r.model, student_w, val)["ne"]
                    if val_ne < best_val:
                        best, best_val, best_r = knobs, val_ne, r
                record("AH tuned", 0, best_r, dict(knobs=best))
            elif "AH tuned" in args.variants:
                record("AH tuned", init, train(DistillConfig(adapter="none", **best), init), dict(knobs=best))
        alone = [r["ne_true"] for r in rows if r["seed"] == seed and r["vertical"] == vert.name and r["variant"] == "alone"]
        log(f"  {vert.name}: teacher NE {t_ne['ne']:.4f} (vs truth {t_ne['ne_true']:.4f}); alone NE vs truth "
            f"{np.mean(alone):.4f}; AH tuned picked {best}; {time.perf_counter() - t0:.0f}s")
    return rows, teacher_rows, age_rows


def teacher_by_age(world: ExFMWorld, v: int, ev: dict, teacher: Snapshots, adapter: StudentAdapter, args,
                   seed: int) -> list[dict]:
    """NE against the truth of the eval day's traffic scored by each snapshot (age = log time
    minus its data end): raw, through the student's trained adapter, and the fresh snapshot."""
    out = []
    for e in sorted(teacher.scorers):
        age = ev["times"] - e
        t = teacher.scorers[e].logits(ev["batch"])
        with torch.no_grad():
            sa = adapter(torch.from_numpy(t), torch.from_numpy(age.astype(np.float32))).numpy()
        out.append(dict(seed=seed, vertical=world.verticals[v].name, snapshot_end=e, age=float(age.mean()),
                        raw=cross_entropy_ne(ev["probs"], 1 / (1 + np.exp(-t))),
                        sa=cross_entropy_ne(ev["probs"], 1 / (1 + np.exp(-sa)))))
    return out


def interval(x: np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval)."""
    n = len(x)
    if n < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(t95(n - 1) * x.std(ddof=1) / np.sqrt(n))


def paired_deltas(rows: list[dict], metric: str) -> dict[tuple[str, str], np.ndarray]:
    """(vertical, variant) -> per-seed delta vs alone of the same init, mean over inits; and
    (vertical, "null") -> alone(init 1) - alone(init 0)."""
    by = {(r["seed"], r["vertical"], r["variant"], r["init"]): r[metric] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    verticals = list(dict.fromkeys(r["vertical"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != "alone"]
    inits = sorted({r["init"] for r in rows})
    out = {}
    for vert in verticals:
        for var in variants:
            out[(vert, var)] = np.array([np.mean([by[(s, vert, var, i)] - by[(s, vert, "alone", i)] for i in inits])
                                         for s in seeds])
        if len(inits) > 1:
            out[(vert, "null")] = np.array([by[(s, vert, "alone", 1)] - by[(s, vert, "alone", 0)] for s in seeds])
    return out


def contrasts(rows: list[dict], metric: str, verticals: list[str]) -> dict[str, np.ndarray]:
    """The issue's targets, per seed over ``verticals`` (mean): AH - main, (AH+SA) - AH, ..."""
    by = {(r["seed"], r["vertical"], r["variant"], r["init"]): r[metric] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    inits = sorted({r["init"] for r in rows})
    pairs = {"AH - main": ("AH", "main"), "AH tuned - main": ("AH tuned", "main"), "AH+SA - AH": ("AH+SA", "AH"),
             "AH+SA - AH x2": ("AH+SA", "AH x2"), "AH x2 - AH": ("AH x2", "AH"),
             "main+SA - main": ("main+SA", "main"), "AH+SA - main+SA": ("AH+SA", "main+SA")}
    present = {r["variant"] for r in rows}
    return {name: np.array([np.mean([by[(s, v, a, i)] - by[(s, v, b, i)] for v in verticals for i in inits])
                            for s in seeds]) for name, (a, b) in pairs.items() if {a, b} <= present}


def tables(rows, teacher_rows, ceilings, seconds, load) -> str:
    seeds = sorted({r["seed"] for r in rows})
    verticals = list(dict.fromkeys(r["vertical"] for r in rows))
    lines = ["### Power check: the world's ceilings (numpy, the best pooled teacher, NE vs truth)", "",
             "| vertical | raw stale teacher | recalibrated per vertical | + age | fresh, recalibrated | truth | "
             "AH ceiling | SA ceiling | age part |", "|---|---|---|---|---|---|---|---|---|"]
    for vert in verticals:
        c = [x for x in ceilings if x["vertical"] == vert]
        m = {k: np.mean([x[k] for x in c]) for k in c[0] if k != "vertical"}
        lines.append(f"| {vert} | {m['teacher_raw']:.4f} | {m['recalibrated']:.4f} | {m['recalibrated_with_age']:.4f} | "
                     f"{m['fresh_recalibrated']:.4f} | {m['truth']:.4f} | {m['ah_ceiling']:+.4f} | {m['sa_ceiling']:+.4f} | "
                     f"{m['sa_age_part']:+.4f} |")
    lines += ["", "### NE of the serving tower on the eval day (mean over seeds and inits; lower is better)", "",
              "| vertical | variant | NE (labels) | NE (vs true p) | AUC |", "|---|---|---|---|---|"]
    for vert in verticals:
        tr = [t for t in teacher_rows if t["vertical"] == vert]
        lines.append(f"| {vert} | trained teacher (stale, raw) | {np.mean([t['ne'] for t in tr]):.4f} | "
                     f"{np.mean([t['ne_true'] for t in tr]):.4f} | |")
        lines.append(f"| {vert} | ground truth | | {np.mean([t['truth_ne_true'] for t in tr]):.4f} | |")
        for var in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["vertical"] == vert and r["variant"] == var]
            lines.append(f"| {vert} | {var} | {np.mean([r['ne'] for r in mine]):.4f} | "
                         f"{np.mean([r['ne_true'] for r in mine]):.4f} | {np.mean([r['auc'] for r in mine]):.4f} |")
    for metric, label in (("ne_true", "NE vs the true probabilities"), ("ne", "NE vs sampled labels")):
        d = paired_deltas(rows, metric)
        lines += ["", f"### Paired NE deltas vs the student alone ({label}): mean [95% interval] over {len(seeds)} seeds",
                  "", "| variant | " + " | ".join(verticals) + " |", "|---|" + "---|" * len(verticals)]
        for var in dict.fromkeys(k[1] for k in d):
            cells = []
            for vert in verticals:
                m, h = interval(d[(vert, var)])
                star = " *" if var != "null" and abs(m) > h else ""
                cells.append(f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}]{star}")
            name = "null: alone vs alone (other init)" if var == "null" else var
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        biased = [v for v in verticals if not v.startswith("v0")]
        lines += ["", f"Contrasts on the biased verticals ({', '.join(biased)}, mean of the two) and on {verticals[0]}:", "",
                  f"| contrast | biased verticals | {verticals[0]} |", "|---|---|---|"]
        cb, c0 = contrasts(rows, metric, biased), contrasts(rows, metric, verticals[:1])
        for name in cb:
            cells = []
            for c in (cb, c0):
                m, h = interval(c[name])
                cells.append(f"{m:+.4f} [{m - h:+.4f}, {m + h:+.4f}]{' *' if abs(m) > h else ''}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    knobs = [json.dumps(r["knobs"]) for r in rows if r["variant"] == "AH tuned" and r["init"] == 0]
    lines += ["", "`*`: the 95% interval excludes 0 (t distribution over seeds; each seed's delta is the mean over "
              "the inits of variant minus alone with the same init).",
              f"AH tuned picked (per seed and vertical): {', '.join(sorted(set(knobs)))}.",
              f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {len({r['init'] for r in rows})} inits; "
              f"{seconds:.0f} s wall on a machine of {os.cpu_count()} cores, load average {load}."]
    return "\n".join(lines)


def figure(rows, age_rows, path: Path, trained_ages: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verticals = list(dict.fromkeys(r["vertical"] for r in rows))
    d = paired_deltas(rows, "ne_true")
    variants = [v for v in dict.fromkeys(k[1] for k in d) if v != "null"]
    fig, axes = plt.subplots(1, len(verticals) + 1, figsize=(5 * (len(verticals) + 1), 4.6))
    for ax in axes[1:len(verticals)]:
        ax.sharey(axes[0])
    for ax, vert in zip(axes, verticals):
        if (vert, "null") in d:
            m, h = interval(d[(vert, "null")])
            sd = d[(vert, "null")].std(ddof=1)
            ax.axhspan(-2 * sd, 2 * sd, color="0.85", label="null: ±2 sd of alone vs alone")
        for i, var in enumerate(variants):
            x = d[(vert, var)]
            ax.scatter(np.full(len(x), i) + np.linspace(-0.12, 0.12, len(x)), x, s=12, color="C0", alpha=0.6)
            m, h = interval(x)
            ax.errorbar(i + 0.25, m, yerr=h, fmt="o", color="C3", capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(variants)), variants, rotation=30)
        ax.set_title(f"{vert}: NE vs truth minus alone\n(dots: seeds; red: mean, 95% interval)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[-1]
    for j, vert in enumerate(verticals):
        mine = [r for r in age_rows if r["vertical"] == vert]
        ends = sorted({r["snapshot_end"] for r in mine})
        ages = [np.mean([r["age"] for r in mine if r["snapshot_end"] == e]) for e in ends]
        raw = [np.mean([r["raw"] for r in mine if r["snapshot_end"] == e]) for e in ends]
        sa = [np.mean([r["sa"] for r in mine if r["snapshot_end"] == e]) for e in ends]
        ax.plot(ages, raw, "o-", color=f"C{j}", label=f"{vert} raw")
        ax.plot(ages, sa, "s--", color=f"C{j}", label=f"{vert} through SA")
    ax.axvspan(*trained_ages, color="0.92", label="ages SA was trained on")
    ax.set_xlabel("snapshot age on the eval day, days (youngest: the fresh teacher)")
    ax.set_ylabel("teacher NE vs truth")
    ax.set_title("teacher by snapshot age (mean over seeds)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distill")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--inits", type=int, default=2)
    p.add_argument("--teacher-per-day", type=int, default=45_000, help="pooled examples a day for the teacher")
    p.add_argument("--first-snapshot", type=int, default=6, help="the first snapshot is trained on days [0, this)")
    p.add_argument("--snapshot-every", type=int, default=3)
    p.add_argument("--delay", type=float, default=1.0, help="days from a snapshot's data end to its publication")
    p.add_argument("--student-days", type=int, default=4)
    p.add_argument("--student-per-day", type=int, default=25_000, help="fresh examples a day per vertical")
    p.add_argument("--eval-day", type=int, default=13)
    p.add_argument("--eval-examples", type=int, default=20_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, a process each (default 1)")
    world = ExFMWorld.__dataclass_fields__
    p.add_argument("--rotation", type=float, default=world["rotation"].default, help="radians a day")
    p.add_argument("--bias-trend", type=float, default=world["bias_trend"].default, help="logit a day")
    p.add_argument("--scale-trend", type=float, default=world["scale_trend"].default,
                   help="log of the logit scale a day")
    choices = ["main", "AH", "AH x2", "AH tuned", "AH+SA", "main+SA"]
    p.add_argument("--variants", nargs="+", choices=choices, default=choices,
                   help="variants beside alone (default: all)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RUN_JSON",
                   help="no training: the results of these runs' run.json together (same world and settings, "
                        "other seeds; the variants all of them trained)")
    args = p.parse_args()
    if args.merge:
        merge(args)
        return
    torch.set_num_threads(1)
    started = time.perf_counter()
    logs: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        logs.append(s)

    student_w, _ = workloads()
    ceilings = []
    for seed in args.seeds:
        ceilings += [dict(seed=seed, **c) for c in world_ceilings(
            make_world(student_w, seed, args), snapshot_every=args.snapshot_every, delay=args.delay,
            first_day=args.eval_day - args.student_days, days=args.student_days, n=10_000)]
    low = [c for c in ceilings if c["ah_ceiling"] < 0.01 or c["sa_ceiling"] < 0.01]
    log(f"power check: {len(ceilings) - len(low)}/{len(ceilings)} (seed, vertical) have AH and SA ceilings >= 0.01 NE")
    rows, teacher_rows, age_rows = [], [], []
    children_cpu = 0.0

    def done(seed: int, result) -> str:
        nonlocal children_cpu
        r, t, a, seed_logs, cpu = result
        rows.extend(r)
        teacher_rows.extend(t)
        age_rows.extend(a)
        logs.extend(seed_logs)
        children_cpu += cpu if args.jobs > 1 else 0.0
        log(f"seed {seed} done ({cpu:.0f}s CPU): {time.perf_counter() - started:.0f}s wall, load average "
            f"{load_average()}")
        return write_results(args, rows, teacher_rows, age_rows, ceilings, logs,  # a kill keeps these
                             time.perf_counter() - started, time.process_time() + children_cpu, load_average())

    with tempfile.TemporaryDirectory(prefix="recserve-distill-") as work:
        if args.jobs > 1:  # a process per seed (spawned: no torch state shared with this one)
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(seed_job, seed, args, work): seed for seed in args.seeds}
                for f in as_completed(futures):
                    text = done(futures[f], f.result())
        else:
            for seed in args.seeds:
                text = done(seed, seed_job(seed, args, work, log))
    print(text)
    print(f"total {time.perf_counter() - started:.0f}s wall, {time.process_time() + children_cpu:.0f}s CPU; "
          f"written {args.out}/table.md, runs.csv, distill.png and run.json")


def seed_job(seed: int, args, work: str, log=None):
    """One seed's run, in this process or a pool's: (rows, teacher rows, age rows, log lines, CPU seconds)."""
    torch.set_num_threads(1)
    lines: list[str] = []

    def child_log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    c0 = time.process_time()
    r, t, a = run_seed(seed, args, Path(work), log or child_log)
    return r, t, a, lines, time.process_time() - c0


SEED_FREE = {"out", "seeds", "jobs", "variants", "merge"}  # the args runs to merge may differ in


def merge(args) -> None:
    runs = [json.loads(p.read_text()) for p in args.merge]
    for p, r in zip(args.merge[1:], runs[1:]):
        differ = {k for k in (set(r["args"]) | set(runs[0]["args"])) - SEED_FREE
                  if r["args"].get(k) != runs[0]["args"].get(k)}
        if differ:
            sys.exit(f"--merge: {p} differs from {args.merge[0]} in {', '.join(sorted(differ))}")
    seeds = [s for r in runs for s in {row["seed"] for row in r["rows"]}]
    if len(seeds) != len(set(seeds)):
        sys.exit(f"--merge: the runs share seeds {sorted({s for s in seeds if seeds.count(s) > 1})}")
    common = set.intersection(*({row["variant"] for row in r["rows"]} for r in runs))
    for k in set(runs[0]["args"]) - SEED_FREE:
        setattr(args, k, runs[0]["args"][k])
    args.seeds = sorted(seeds)
    args.variants = sorted(common - {"alone"})
    text = write_results(
        args, [row for r in runs for row in r["rows"] if row["variant"] in common],
        [t for r in runs for t in r["teacher"]], [a for r in runs for a in r["teacher_by_age"]],
        [c for r in runs for c in r["ceilings"]], [line for r in runs for line in r["log"]],
        sum(r["seconds"] for r in runs), sum(r.get("cpu_seconds", 0.0) for r in runs),
        "; ".join(r["load_average"] for r in runs), merged=[str(p) for p in args.merge])
    print(text)


def training_ages(args) -> tuple[float, float]:
    """The snapshot ages (days) of the students' training days: the range SA is trained on."""
    times = np.linspace(args.eval_day - args.student_days, args.eval_day, 10_001)[:-1]
    age = snapshot_of(times, snapshot_every=args.snapshot_every, delay=args.delay)[1]
    return float(age.min()), float(age.max())


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def write_results(args, rows, teacher_rows, age_rows, ceilings, logs: list[str], seconds: float, cpu_seconds: float,
                  load: str, merged: list[str] | None = None) -> str:
    """table.md, distill.png, runs.csv and run.json of the seeds done so far; the table's text."""
    import csv
    text = tables(rows, teacher_rows, ceilings, seconds, load) + f" CPU time {cpu_seconds:.0f} s."
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    figure(rows, age_rows, args.out / "distill.png", training_ages(args))
    with open(args.out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", "vertical", "variant", "init", "ne", "ne_true", "auc", "knobs"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "knobs": json.dumps(r.get("knobs")) if r.get("knobs") else ""})
    (args.out / "run.json").write_text(json.dumps(dict(
        command="nice -n 10 .venv/bin/python benchmarks/distill.py " + " ".join(sys.argv[1:]), merged=merged,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, seconds=seconds,
        cpu_seconds=cpu_seconds, load_average=load, log=logs, ceilings=ceilings, teacher=teacher_rows,
        teacher_by_age=age_rows, rows=rows), indent=1, default=str))
    return text


if __name__ == "__main__":
    main()
