"""Soak: the stack at 70% of its maximum for a stated time, RSS, open file descriptors and
threads of every process sampled, every OK answer's scores checked, then repeated rounds of
the same bad inputs; reports growth (issues 11 §5 and 22 §5).

    .venv/bin/python benchmarks/soak.py --target serve --minutes 30 --out benchmarks/results/soak

1. warm-up, then the maximum: closed loop (``--concurrency`` workers) -> OK/s
2. soak: open loop at ``--load`` (0.7) x the maximum for ``--minutes``, in slices of
   ``--slice`` s; after each slice the RSS, open file descriptors and threads of every
   process of the stack (the server's process tree: for Ray Serve the driver, GCS, raylet,
   proxy, controller and every replica); every OK answer's scores against the package scored
   in this process (LocalRanker; float16 on the wire)
3. bad inputs: ``--bad-rounds`` rounds of the same malformed requests (every case once per
   round, ``--bad-repeat`` times), the same figures after each round
4. growth: totals at the end vs after the first slice (the stack is warm by then), and per
   process; bad-input growth: after the last round vs after the first

Targets: <= 5% growth over 30 minutes, 0 wrong scores, no failed request beyond shed ones
(RESOURCE_EXHAUSTED), no growth over repeated rounds of the same bad inputs. Writes
``soak-<target>.md``, ``soak-<target>.json`` and ``soak-<target>.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.cpu import process_tree  # noqa: E402
from loadtest.driver import closed_loop, open_loop, warm_up  # noqa: E402
from loadtest.stats import percentiles_ms  # noqa: E402


def process_figures(root_pid: int) -> dict[str, dict[str, float]]:
    """Per process of ``root_pid``'s tree, keyed 'pid title': resident MB, open file
    descriptors and threads."""
    out = {}
    for p in process_tree(root_pid):
        try:
            with p.oneshot():
                title = " ".join(p.cmdline())[:90] or p.name()
                out[f"{p.pid} {title}"] = {"rss_mb": p.memory_info().rss / 1e6, "fds": p.num_fds(),
                                           "threads": p.num_threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def sample(root_pid: int) -> dict:
    """One sample of the stack: per-process figures and their totals."""
    figures = process_figures(root_pid)
    return {"rss_mb": {k: v["rss_mb"] for k, v in figures.items()},
            "fds": {k: v["fds"] for k, v in figures.items()},
            "threads": {k: v["threads"] for k, v in figures.items()},
            "total_mb": sum(v["rss_mb"] for v in figures.values()),
            "total_fds": sum(v["fds"] for v in figures.values()),
            "total_threads": sum(v["threads"] for v in figures.values())}


def wrong_scores(rec, expected: list[np.ndarray], tol: float) -> int:
    """OK answers of ``rec`` whose scores differ from the expected ones of their trace request."""
    from recserve.v1 import ranker_pb2

    wrong = 0
    for code, k, raw in zip(rec.codes, rec.trace_index, rec.responses):
        if code == "OK":
            got = np.asarray(ranker_pb2.PredictResponse.FromString(raw).scores, np.float32)
            wrong += int(got.shape != expected[k].shape or not np.allclose(got, expected[k], atol=tol))
    return wrong


def bad_requests(workload) -> list[tuple[str, bytes]]:
    """(case, serialized PredictRequest): the malformed inputs of the issue, for the served workload."""
    from recserve.synth import TrafficGenerator
    from serving.api.codec import encode_request

    good = TrafficGenerator(workload, seed=11).batch(8)
    sparse = {f: (b.values, b.lengths) for f, b in good.sparse.items()}
    first = workload.features[0]
    cases = []

    def add(case, mutate):
        r = encode_request(good.dense, sparse)
        mutate(r)
        cases.append((case, r.SerializeToString()))

    add("unknown feature", lambda r: r.sparse["no_such_feature"].lengths.extend([0] * 8))
    add("100 KB feature name", lambda r: r.sparse["f" * 100_000].lengths.extend([0] * 8))
    add("lengths off by one", lambda r: r.sparse[first].lengths.__setitem__(0, r.sparse[first].lengths[0] + 1))
    add("id out of range", lambda r: r.sparse[first].values.__setitem__(0, 10**12))
    add("negative id", lambda r: r.sparse[first].values.__setitem__(0, -1))
    add("NaN dense", lambda r: r.dense.__setitem__(0, float("nan")))
    add("1e30 dense", lambda r: r.dense.__setitem__(1, 1e30))
    add("wrong dense width", lambda r: r.dense.pop())
    add("empty batch", lambda r: (r.ClearField("dense"), setattr(r, "batch_size", 0)))
    add("unknown model", lambda r: setattr(r, "model", "m" * 100_000))
    add("unknown version", lambda r: setattr(r, "version", "v999"))
    return cases


async def bad_round(address: str, cases, repeat: int) -> dict[str, int]:
    from serving.api.wire import PREDICT_METHOD, timeout_metadata

    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_unary(PREDICT_METHOD)
        for _ in range(repeat):
            for _, payload in cases:
                try:
                    await call(payload, timeout=10, metadata=(timeout_metadata(10),))
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1
    return codes


async def soak(address: str, root_pid: int, payloads, workload, args, expected) -> dict:
    await warm_up(address, payloads, 20)
    maximum = await closed_loop(address, payloads, concurrency=args.concurrency, duration_s=args.max_duration,
                                timeout_s=5.0)
    max_ok = sum(c == "OK" for c in maximum.codes) / maximum.wall_s
    rate = args.load * max_ok
    print(f"maximum {max_ok:.1f} OK/s; soaking at {rate:.1f} req/s for {args.minutes:g} min", flush=True)
    samples = []
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < args.minutes * 60:
        rec = await open_loop(address, payloads, rate=rate, duration_s=args.slice, timeout_s=args.timeout,
                              seed=100 + k, start_index=k * 37, keep_responses=True)
        k += 1
        ok = np.array([c == "OK" for c in rec.codes])
        codes: dict[str, int] = {}
        for c in rec.codes:
            codes[c] = codes.get(c, 0) + 1
        p50, p99 = percentiles_ms(rec.latency_s[ok], (50, 99)) if ok.any() else (float("nan"), float("nan"))
        samples.append({"t_s": time.monotonic() - start, "requests": len(rec), "ok": int(ok.sum()), "codes": codes,
                        "wrong": wrong_scores(rec, expected, args.tolerance), "p50_ms": p50, "p99_ms": p99,
                        "load_average": os.getloadavg()[0], **sample(root_pid)})
        x = samples[-1]
        print(f"  t={x['t_s']:6.0f}s  ok {x['ok']}/{len(rec)} {codes}  wrong {x['wrong']}  p99 {p99:.1f} ms  "
              f"RSS {x['total_mb']:.0f} MB, {x['total_fds']} fds, {x['total_threads']} threads over "
              f"{len(x['rss_mb'])} processes  (load average {x['load_average']:.1f})", flush=True)
    cases = bad_requests(workload)
    rounds = []
    for i in range(args.bad_rounds):
        codes = await bad_round(address, cases, args.bad_repeat)
        rounds.append({"round": i + 1, "codes": codes, **sample(root_pid)})
        print(f"  bad round {i + 1}: {codes}  RSS {rounds[-1]['total_mb']:.0f} MB", flush=True)
    return {"max_ok_per_s": max_ok, "rate": rate, "samples": samples, "bad_rounds": rounds,
            "bad_cases": [c for c, _ in cases]}


def growth(first: dict[str, float], last: dict[str, float]) -> list[tuple[str, float, float]]:
    """(process, MB first, MB last) for processes present in both, largest growth first."""
    rows = [(name, first[name], last[name]) for name in first if name in last]
    return sorted(rows, key=lambda r: r[2] - r[1], reverse=True)


def _growth_pct(first: float, last: float) -> float:
    return (last - first) / first * 100 if first else float("nan")


def report(target: str, r: dict, args) -> str:
    s, b = r["samples"], r["bad_rounds"]
    first, last = s[0], s[-1]
    ok = sum(x["ok"] for x in s)
    sent = sum(x["requests"] for x in s)
    codes: dict[str, int] = {}
    for x in s:
        for c, n in x["codes"].items():
            codes[c] = codes.get(c, 0) + n
    failed = {c: n for c, n in codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    wrong = sum(x["wrong"] for x in s)
    loads = [x["load_average"] for x in s]
    lines = [
        f"### soak, {target}: {r['rate']:.1f} req/s (= {args.load:g} x the maximum of {r['max_ok_per_s']:.1f} OK/s) "
        f"for {s[-1]['t_s'] / 60:.1f} min",
        "",
        f"{ok:,} of {sent:,} requests OK, {codes.get('RESOURCE_EXHAUSTED', 0):,} shed, failed beyond shed: "
        f"{sum(failed.values()):,} {failed or ''}; wrong scores: {wrong} (every OK answer checked); P99 per "
        f"{args.slice:g} s slice {min(x['p99_ms'] for x in s):.1f}-{max(x['p99_ms'] for x in s):.1f} ms; "
        f"{len(first['rss_mb'])} processes sampled; load average (1 min) {min(loads):.1f}-{max(loads):.1f}",
        "",
        "| figure (totals over the stack's processes) | first | last | growth | target |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label, unit in (("total_mb", "RSS", " MB"), ("total_fds", "open file descriptors", ""),
                             ("total_threads", "threads", "")):
        lines.append(f"| {label} over the soak (after slice 1 -> end) | {first[key]:.0f}{unit} | {last[key]:.0f}{unit} "
                     f"| {_growth_pct(first[key], last[key]):+.1f}% | <= 5% over 30 min |")
    if b:
        for key, label, unit in (("total_mb", "RSS", " MB"), ("total_fds", "open file descriptors", ""),
                                 ("total_threads", "threads", "")):
            lines.append(f"| {label} over {len(b)} rounds of the same {len(r['bad_cases'])} bad inputs "
                         f"(x{args.bad_repeat}; round 1 -> {len(b)}) | {b[0][key]:.0f}{unit} | {b[-1][key]:.0f}{unit} "
                         f"| {_growth_pct(b[0][key], b[-1][key]):+.1f}% | no growth |")
        lines.append(f"\nbad-input codes per round: {b[-1]['codes']}")
    lines += ["", "largest per-process growth over the soak:", "", "| process | first MB | last MB |", "| --- | ---: | ---: |"]
    for name, a, z in growth(first["rss_mb"], last["rss_mb"])[:8]:
        lines.append(f"| {name[:80]} | {a:.0f} | {z:.0f} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """RSS, file descriptors, threads and P99 per slice against time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(4, 1, figsize=(7, 9), sharex=True)
    for ax, key, label in zip(axes, ("total_mb", "total_fds", "total_threads", "p99_ms"),
                              ("RSS, MB (all processes)", "open fds", "threads", "P99 per slice, ms")):
        ax.plot(t, [x[key] for x in s], marker="o")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"soak, {r['target']}: {r['rate']:.1f} req/s ({r['load']:g} x maximum)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("monolith", "serve"), default="serve")
    p.add_argument("--package", default="default")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--load", type=float, default=0.7, help="fraction of the measured maximum")
    p.add_argument("--slice", type=float, default=30.0, help="seconds between RSS samples")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-duration", type=float, default=12.0)
    p.add_argument("--bad-rounds", type=int, default=5)
    p.add_argument("--bad-repeat", type=int, default=50, help="times each bad case is sent per round")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    p.add_argument("--serve-arg", action="append", default=[])
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest |served - in-process| score (float16 pooled embeddings on the wire)")
    args = p.parse_args(argv)

    from loadtest.targets import MonolithServer, ServeStack
    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.default_package import resolve_package

    package = resolve_package(args.package)
    workload = ModelPackage.open(package).manifest.workload
    trace = make_trace(workload, args.requests, seed=0)
    from serving.engine.local_ranker import LocalRanker

    ranker = LocalRanker.load(package)
    expected = [ranker.score(b) for b in trace.batches]  # what every OK answer must say
    args.out.mkdir(parents=True, exist_ok=True)
    server = (MonolithServer(package, log_dir=args.out) if args.target == "monolith"
              else ServeStack(package, name="soak", log_dir=args.out, extra_args=tuple(args.serve_arg)))
    with server:
        result = asyncio.run(soak(server.address, server.proc.pid, trace.payloads, workload, args, expected))
    result.update(target=args.target, package=str(package), minutes=args.minutes, load=args.load)
    text = report(args.target, result, args)
    print(text)
    (args.out / f"soak-{args.target}.md").write_text(text)
    (args.out / f"soak-{args.target}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    plot(result, args.out / f"soak-{args.target}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
