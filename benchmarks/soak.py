"""Soak: the stack at 70% of its maximum for a stated time, RSS of every process sampled,
then repeated rounds of the same bad inputs; reports memory growth (issue 11 §5).

    .venv/bin/python benchmarks/soak.py --target serve --minutes 30 --out benchmarks/results/soak

1. warm-up, then the maximum: closed loop (``--concurrency`` workers) -> OK/s
2. soak: open loop at ``--load`` (0.7) x the maximum for ``--minutes``, in slices of
   ``--slice`` s; after each slice the RSS of every process of the stack (the server's
   process tree: for Ray Serve the driver, GCS, raylet, proxy, controller and every replica)
3. bad inputs: ``--bad-rounds`` rounds of the same malformed requests (every case once per
   round, ``--bad-repeat`` times), RSS after each round
4. growth: total RSS at the end vs after the first slice (the stack is warm by then), and
   per process; bad-input growth: after the last round vs after the first

Target: <= 5% over 30 minutes, and no growth over repeated rounds of the same bad inputs.
Writes ``soak-<target>.md`` and ``soak-<target>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def rss_by_process(root_pid: int) -> dict[str, float]:
    """MB of resident memory of ``root_pid`` and every descendant, keyed 'pid title'."""
    out = {}
    for p in process_tree(root_pid):
        try:
            title = " ".join(p.cmdline())[:90] or p.name()
            out[f"{p.pid} {title}"] = p.memory_info().rss / 1e6
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


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


async def soak(address: str, root_pid: int, payloads, workload, args) -> dict:
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
                              seed=100 + k, start_index=k * 37)
        k += 1
        ok = np.array([c == "OK" for c in rec.codes])
        rss = rss_by_process(root_pid)
        p50, p99 = percentiles_ms(rec.latency_s[ok], (50, 99)) if ok.any() else (float("nan"), float("nan"))
        samples.append({"t_s": time.monotonic() - start, "requests": len(rec), "ok": int(ok.sum()),
                        "p50_ms": p50, "p99_ms": p99, "rss_mb": rss, "total_mb": sum(rss.values())})
        print(f"  t={samples[-1]['t_s']:6.0f}s  ok {ok.sum()}/{len(rec)}  p99 {p99:.1f} ms  "
              f"RSS {samples[-1]['total_mb']:.0f} MB over {len(rss)} processes", flush=True)
    cases = bad_requests(workload)
    rounds = []
    for i in range(args.bad_rounds):
        codes = await bad_round(address, cases, args.bad_repeat)
        rss = rss_by_process(root_pid)
        rounds.append({"round": i + 1, "codes": codes, "rss_mb": rss, "total_mb": sum(rss.values())})
        print(f"  bad round {i + 1}: {codes}  RSS {rounds[-1]['total_mb']:.0f} MB", flush=True)
    return {"max_ok_per_s": max_ok, "rate": rate, "samples": samples, "bad_rounds": rounds,
            "bad_cases": [c for c, _ in cases]}


def growth(first: dict[str, float], last: dict[str, float]) -> list[tuple[str, float, float]]:
    """(process, MB first, MB last) for processes present in both, largest growth first."""
    rows = [(name, first[name], last[name]) for name in first if name in last]
    return sorted(rows, key=lambda r: r[2] - r[1], reverse=True)


def report(target: str, r: dict, args) -> str:
    s, b = r["samples"], r["bad_rounds"]
    first, last = s[0], s[-1]
    soak_growth = (last["total_mb"] - first["total_mb"]) / first["total_mb"] * 100
    ok = sum(x["ok"] for x in s)
    sent = sum(x["requests"] for x in s)
    lines = [
        f"### soak, {target}: {r['rate']:.1f} req/s (= {args.load:g} x the maximum of {r['max_ok_per_s']:.1f} OK/s) "
        f"for {s[-1]['t_s'] / 60:.1f} min",
        "",
        f"{ok:,} of {sent:,} requests OK; P99 per {args.slice:g} s slice {min(x['p99_ms'] for x in s):.1f}-"
        f"{max(x['p99_ms'] for x in s):.1f} ms; {len(first['rss_mb'])} processes sampled",
        "",
        "| figure | first | last | growth | target |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| total RSS over the soak (after slice 1 -> end) | {first['total_mb']:.0f} MB | {last['total_mb']:.0f} MB | "
        f"{soak_growth:+.1f}% | <= 5% over 30 min |",
    ]
    if b:
        bad_growth = (b[-1]["total_mb"] - b[0]["total_mb"]) / b[0]["total_mb"] * 100
        lines.append(f"| total RSS over {len(b)} rounds of the same {len(r['bad_cases'])} bad inputs "
                     f"(x{args.bad_repeat}; round 1 -> {len(b)}) | {b[0]['total_mb']:.0f} MB | {b[-1]['total_mb']:.0f} MB "
                     f"| {bad_growth:+.1f}% | no growth |")
        lines.append(f"\nbad-input codes per round: {b[-1]['codes']}")
    lines += ["", "largest per-process growth over the soak:", "", "| process | first MB | last MB |", "| --- | ---: | ---: |"]
    for name, a, z in growth(first["rss_mb"], last["rss_mb"])[:8]:
        lines.append(f"| {name[:80]} | {a:.0f} | {z:.0f} |")
    return "\n".join(lines) + "\n"


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
    args = p.parse_args(argv)

    from loadtest.targets import MonolithServer, ServeStack
    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.default_package import resolve_package

    package = resolve_package(args.package)
    workload = ModelPackage.open(package).manifest.workload
    trace = make_trace(workload, args.requests, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    server = (MonolithServer(package, log_dir=args.out) if args.target == "monolith"
              else ServeStack(package, name="soak", log_dir=args.out, extra_args=tuple(args.serve_arg)))
    with server:
        result = asyncio.run(soak(server.address, server.proc.pid, trace.payloads, workload, args))
    result.update(target=args.target, package=str(package), minutes=args.minutes, load=args.load)
    text = report(args.target, result, args)
    print(text)
    (args.out / f"soak-{args.target}.md").write_text(text)
    (args.out / f"soak-{args.target}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
