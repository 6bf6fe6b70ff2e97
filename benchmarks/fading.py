"""Lookups and latency saved by fading one feature, measured on a served package.

For each setting (no fading; coverage 0.5 and 0 with the 5% control cohort; coverage 0
once the schedule is done and the control is released) the same seeded trace is scored
through the serving cores in this process, the way the router runs them: fading step ->
split by plan -> one lookup per shard that has ids -> dense tower. Settings take turns
request by request (in rotating order), so load from other processes hits all of them
alike; torch runs one intra-op thread (``--threads``), as a replica serving many
concurrent requests would. Printed per setting: ids
looked up per request (all, and of the faded feature), shard calls per request, the
lookup time of the shard holding the feature, the fading step's own cost and the
request latency (p50, p99), each with the no-fading reference beside it.

With ``--grpc`` the same trace also goes end to end through the monolith gRPC server
(serving/standalone/monolith.py) with the fading step as its feature filter.

Run (default model: criteo-kaggle capped at 100k rows, trained on first use)::

    .venv/bin/python benchmarks/fading.py                      # cat_2: the largest table
    .venv/bin/python benchmarks/fading.py --feature cat_11 --requests 400 --grpc
    .venv/bin/python benchmarks/fading.py --isolate --grpc      # cat_2's table alone on shard 1
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.fading import schedule as sched
from serving.fading.runtime import FadingFilter
from serving.fading.schedule import Schedule, Status
from serving.fading.store import FadingStore
from serving.engine.local_ranker import LocalRanker

SETTINGS = (  # name, coverage, control fraction, done
    ("reference (no fading)", 1.0, 0.0, False),
    ("coverage 0.5, control 5%", 0.5, 0.05, False),
    ("coverage 0, control 5%", 0.0, 0.05, False),
    ("coverage 0, done", 0.0, 0.0, True),
)


def put_state(store: FadingStore, model: str, feature: str, coverage: float, control: float, done: bool) -> None:
    def change(s):
        now = time.time()
        if coverage >= 1.0:
            return sched.set_coverage(s, 1.0, now)
        s = sched.set_coverage(s, 1.0, now)
        s = sched.start(s, Schedule.parse(f"{coverage}", "0" if done else "1d"), now, control_fraction=control)
        return sched.tick(s, now) if done else s

    new = store.transition(model, feature, change, action="bench", actor="benchmarks/fading.py")
    assert new.status == (Status.DONE if done else (Status.MANUAL if coverage >= 1 else Status.RUNNING))


def isolated_package(pkg: ModelPackage, feature: str, out: Path) -> Path:
    """The same model re-exported with ``feature``'s table alone on the last shard (cached)."""
    import json

    import torch

    from recserve.export import export_package
    from recserve.layout import embedding_key
    from sharding.types import Shard, ShardPlan, TableSlice, row_bytes

    m = pkg.manifest
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["model"]["version"] == f"{m.version}-iso-{feature}":
        return out
    table = m.workload.table_of(feature).name
    sd = dict(pkg.load_dense())
    for sh in m.plan.shards:
        for s in pkg.load_shard(sh.index):
            assert s.dtype == "fp32", "--isolate needs an fp32 package"
            key = embedding_key(s.table)
            part = s.weight.float()
            sd[key] = part if key not in sd else torch.cat([sd[key], part])  # row slices arrive in order
    def sl(t):
        return TableSlice(table=t.name, row_start=0, row_end=t.rows, rows_total=t.rows, dim=t.dim,
                          bytes=t.rows * row_bytes(t.dim, "fp32"), cost=t.pooling_factor * t.dim * 4.0)
    rest = tuple(sl(t) for t in m.workload.tables if t.name != table and t.name in m.plan.tables)
    alone = tuple(sl(t) for t in m.workload.tables if t.name == table)
    plan = ShardPlan(strategy="capacity", dtype="fp32", shard_memory=None,
                     shards=(Shard(index=0, slices=rest), Shard(index=1, slices=alone)))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(sd, Path(tmp) / "state.pt")
        export_package(m.workload, Path(tmp) / "state.pt", out, plan=plan, name=m.name,
                       version=f"{m.version}-iso-{feature}", overwrite=True, progress=False)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", default="default", help="model package (default: the default model)")
    ap.add_argument("--feature", default="cat_2", help="feature to fade (default cat_2, criteo's largest table)")
    ap.add_argument("--requests", type=int, default=200, help="requests per setting")
    ap.add_argument("--batch-size", type=int, default=None, help="examples per request (default: the workload's range)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grpc", action="store_true", help="also measure end to end through the monolith gRPC server")
    ap.add_argument("--isolate", action="store_true",
                    help="re-export the package with the feature's table alone on its own shard first")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from recserve.default_package import resolve_package

    path = resolve_package(args.package)
    pkg = ModelPackage.open(path)
    if args.isolate:
        from recserve.default_package import artifacts_dir

        pkg = ModelPackage.open(isolated_package(pkg, args.feature, artifacts_dir() / f"bench-fading-{args.feature}-alone"))
    m = pkg.manifest
    if args.feature not in m.served_features:
        print(f"--feature: {args.feature!r} is not served by {m.name} ({', '.join(m.served_features)})", file=sys.stderr)
        return 2
    ranker = LocalRanker.load(pkg, device=args.device)
    table = m.workload.table_of(args.feature)
    shard_of = sorted({k for k, s in m.plan.slices_of(table.name)})
    others = {t for k in shard_of for t in m.plan.shards[k].tables} - {table.name}
    gen = TrafficGenerator(m.workload, seed=args.seed)
    trace = [gen.batch(args.batch_size) for _ in range(args.requests)]

    tmp = Path(tempfile.mkdtemp(prefix="fading-bench-"))
    filters = {}
    for i, (name, cov, control, done) in enumerate(SETTINGS):
        store = FadingStore(tmp / f"{i}.sqlite")
        put_state(store, m.name, args.feature, cov, control, done)
        filters[name] = FadingFilter(m.name, store, features=m.served_features, background=False)

    for b in trace[:10]:  # warm up every path
        for f in filters.values():
            ranker.score(f(b))

    rows = {name: {"lat": [], "fade": [], "shard": [], "ids": 0, "fids": 0, "calls": 0, "n": 0} for name, *_ in SETTINGS}
    names = [name for name, *_ in SETTINGS]
    for i, b in enumerate(trace):
        for name in names[i % len(names):] + names[: i % len(names)]:  # rotate who goes first
            f, row = filters[name], rows[name]
            t0 = time.perf_counter()
            faded = f(b)
            t1 = time.perf_counter()
            requests = ranker.routing.split(faded)
            outputs = {}
            for k, req in requests.items():
                s0 = time.perf_counter()
                outputs[k] = ranker.shards[k].lookup(req)
                if k in shard_of:
                    row["shard"].append(time.perf_counter() - s0)
            sparse = ranker.routing.assemble(faded.batch_size, outputs)
            ranker.tower.score(faded.dense, sparse)
            t2 = time.perf_counter()
            row["lat"].append(t2 - t0)
            row["fade"].append(t1 - t0)
            row["ids"] += sum(req.num_ids for req in requests.values())
            row["fids"] += int(faded.sparse[args.feature].values.size)
            row["calls"] += len(requests)
            row["n"] += 1

    grpc_lat: dict[str, list[float]] = {}
    if args.grpc:
        from serving.api.client import RankingClient
        from serving.standalone.monolith import MonolithThread

        servers = {name: MonolithThread(pkg, feature_filter=filters[name], device=args.device).start() for name in names}
        clients = {name: RankingClient(f"127.0.0.1:{srv.port}") for name, srv in servers.items()}
        grpc_lat = {name: [] for name in names}
        try:
            for i, b in enumerate(trace):
                sparse = {f: (x.values, x.lengths) for f, x in b.sparse.items()}
                for name in names[i % len(names):] + names[: i % len(names)]:
                    t0 = time.perf_counter()
                    clients[name].predict(b.dense, sparse, unit_ids=b.unit_ids, timeout=30)
                    if i >= 5:
                        grpc_lat[name].append(time.perf_counter() - t0)
        finally:
            for name in names:
                clients[name].close()
                servers[name].stop()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    mean_b = np.mean([b.batch_size for b in trace])
    print(f"fading benchmark: model {m.name} {m.version}, {m.plan.num_shards} shard(s) ({m.plan.strategy}), "
          f"dtype {m.dtype}, device {args.device}, {platform.processor() or platform.machine()}, commit {commit}")
    print(f"feature {args.feature}: table {table.name} ({table.rows:,} rows x {table.dim}), on shard(s) "
          f"{shard_of} with {len(others)} other table(s); {len(trace)} requests, mean batch {mean_b:.0f} examples")
    ref = rows[SETTINGS[0][0]]
    hdr = (f"{'setting':<26} {'ids/req':>9} {'saved':>7} {args.feature + ' ids/req':>14} {'shard calls/req':>15} "
           f"{'shard-' + ','.join(map(str, shard_of)) + ' p50 ms':>16} {'fade step p50 ms':>16} {'p50 ms':>8} {'p99 ms':>8} {'saved p50':>9}")
    print(hdr)
    for name, *_ in SETTINGS:
        row = rows[name]
        n = row["n"]
        saved = 1 - row["ids"] / ref["ids"]
        p50 = pct(row["lat"], 50) * 1e3
        print(f"{name:<26} {row['ids'] / n:>9.1f} {saved:>6.1%} {row['fids'] / n:>14.1f} {row['calls'] / n:>15.2f} "
              f"{pct(row['shard'], 50) * 1e3:>16.3f} {pct(row['fade'], 50) * 1e3:>16.3f} {p50:>8.3f} "
              f"{pct(row['lat'], 99) * 1e3:>8.3f} {1 - p50 / (pct(ref['lat'], 50) * 1e3):>8.1%}")
    if grpc_lat:
        ref_g = pct(grpc_lat[SETTINGS[0][0]], 50)
        print(f"\nend to end through the monolith gRPC server ({len(grpc_lat[SETTINGS[0][0]])} requests each)")
        print(f"{'setting':<26} {'p50 ms':>8} {'p99 ms':>8} {'saved p50':>9}")
        for name, *_ in SETTINGS:
            lat = grpc_lat[name]
            print(f"{name:<26} {pct(lat, 50) * 1e3:>8.3f} {pct(lat, 99) * 1e3:>8.3f} {1 - pct(lat, 50) / ref_g:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
