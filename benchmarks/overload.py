"""Overload: offer 1x, 2x, 3x and 5x the measured maximum and check that the server sheds at the door.

    .venv/bin/python benchmarks/overload.py --target monolith --out benchmarks/results/overload
    RAY_AUTH_MODE=token .venv/bin/python benchmarks/overload.py --target serve --out benchmarks/results/overload

Per target (the default model: criteo-kaggle, tables capped at 100k rows), in one run:

1. unloaded: open loop at ``--unloaded-rps`` -> P50/P99 (the reference latency)
2. maximum: closed loop, ``--concurrency`` workers -> OK/s (the maximum throughput)
3. overload, for each of ``--factors`` in turn: open loop at that multiple of the maximum for
   ``--duration`` s, ``--timeout`` s deadlines; at the same time a probe at ``--unloaded-rps``
   that runs on for ``--recovery-window`` s after the overload ends
4. figures against the targets (issue 22): OK/s >= 90% of the maximum; admitted (OK) P99 <=
   2x the unloaded P99; shed (RESOURCE_EXHAUSTED) answered within 10 ms (P99); recovery:
   time from the end of the overload until the probe's latency stays under the unloaded
   P99 (<= 2 s)

With ``--knee 1,2,4,8,16`` it also measures, before the sweep, the curve the two targets sit on:
a closed loop at each number of callers (``--knee-duration`` s each), OK/s and P50/P90/P99, and
names the fewest in flight that reach 90% of the best throughput (with its P99 against the
unloaded) and the most in flight whose P99 stays within 2x the unloaded (with its share of the
best throughput). Where the first needs more in flight than the second allows, no door depth
meets both targets on that machine.

Writes ``overload-<target>.md`` (a table per factor and one summary row each),
``overload-<target>.json`` and ``overload-<target>.png`` (goodput and admitted P99 against
offered load) under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.driver import RunRecord, closed_loop, open_loop, warm_up  # noqa: E402
from loadtest.stats import percentiles_ms  # noqa: E402


def _ms(x: float) -> str:
    return f"{x:.1f}" if np.isfinite(x) else "-"


def _codes(rec: RunRecord) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in rec.codes:
        out[c] = out.get(c, 0) + 1
    return out


def _p(rec: RunRecord, code: str, q: float, *, sent: bool = False) -> float:
    """The ``q`` percentile (ms) of the ``code`` answers' latency: from each request's scheduled
    time, or (``sent``) from its actual send, which leaves out the load generator's own lag."""
    mask = np.array([c == code for c in rec.codes], bool)
    return percentiles_ms((rec.service_s if sent else rec.latency_s)[mask], (q,))[0]


def recovery_s(probe: RunRecord, overload_end_s: float, bound_ms: float) -> float:
    """Seconds after ``overload_end_s`` (on the probe's clock) until every later probe request
    is OK within ``bound_ms``; 0 if none after the end missed it, inf if the last one did."""
    late = [(t, lat, c) for t, lat, c in zip(probe.scheduled_s, probe.latency_s, probe.codes) if t >= overload_end_s]
    last_bad = None
    for t, lat, c in late:
        if c != "OK" or lat * 1000 > bound_ms:
            last_bad = t
    if last_bad is None:
        return 0.0
    if late and last_bad == late[-1][0]:
        return float("inf")
    return float(last_bad - overload_end_s)


async def overload_at(address: str, payloads, args, factor: float, max_ok_s: float, u99: float) -> dict:
    """``factor`` x ``max_ok_s`` offered for ``args.duration`` s beside the unloaded probe."""
    rate = factor * max_ok_s
    print(f"offering {factor:g}x = {rate:.1f} req/s for {args.duration:.0f} s ...", flush=True)
    overload_task = open_loop(address, payloads, rate=rate, duration_s=args.duration, timeout_s=args.timeout,
                              seed=2, max_requests=int(rate * args.duration * 2) + 10)
    probe_task = open_loop(address, payloads, rate=args.unloaded_rps, duration_s=args.duration + args.recovery_window,
                           timeout_s=args.timeout, seed=3, arrivals="uniform", start_index=7)
    overload, probe = await asyncio.gather(overload_task, probe_task)  # both clocks start within a few ms
    ok = np.array([c == "OK" for c in overload.codes])
    ok_in_window = ok & (overload.scheduled_s < args.duration)
    ok_s = ok_in_window.sum() / args.duration
    return {
        "offered_rps": rate,
        "factor": factor,
        "duration_s": args.duration,
        "timeout_s": args.timeout,
        "codes": _codes(overload),
        "ok_per_s": ok_s,
        "ok_fraction_of_max": ok_s / max_ok_s if max_ok_s else float("nan"),
        "admitted_p50_ms": _p(overload, "OK", 50),
        "admitted_p99_ms": _p(overload, "OK", 99),
        "shed_p50_ms": _p(overload, "RESOURCE_EXHAUSTED", 50),
        "shed_p99_ms": _p(overload, "RESOURCE_EXHAUSTED", 99),
        # the same from each request's actual send: a generator that falls behind on the same cores
        # makes every answer look late; these are the server's own share
        "admitted_p99_sent_ms": _p(overload, "OK", 99, sent=True),
        "shed_p99_sent_ms": _p(overload, "RESOURCE_EXHAUSTED", 99, sent=True),
        "sender_lag_p99_ms": percentiles_ms(overload.latency_s - overload.service_s, (99,))[0],
        "recovery_s": recovery_s(probe, args.duration, u99),
        "probe_codes": _codes(probe),
    }


async def knee(address: str, payloads, concurrencies: list[int], duration_s: float, timeout_s: float) -> list[dict]:
    """A closed loop at each of ``concurrencies`` callers: what each number in flight answers, how fast."""
    rows = []
    for c in concurrencies:
        rec = await closed_loop(address, payloads, concurrency=c, duration_s=duration_s, timeout_s=timeout_s)
        ok = np.array([code == "OK" for code in rec.codes], bool)
        p50, p90, p99 = percentiles_ms(rec.latency_s[ok], (50, 90, 99))
        rows.append({"concurrency": c, "ok_per_s": ok.sum() / rec.wall_s, "p50_ms": p50, "p90_ms": p90,
                     "p99_ms": p99, "codes": _codes(rec)})
        print(f"  {c} in flight: {rows[-1]['ok_per_s']:.1f} OK/s, P99 {_ms(p99)} ms", flush=True)
    return rows


def knee_summary(rows: list[dict], u99: float, *, goodput: float = 0.9, latency: float = 2.0) -> dict:
    """Against the best throughput of ``rows``: the fewest in flight answering ``goodput`` of it
    (and its P99 over ``u99``), the most in flight whose P99 is within ``latency`` x ``u99`` (and
    its share of the best), and whether one depth does both."""
    best = max(r["ok_per_s"] for r in rows)
    enough = [r for r in rows if r["ok_per_s"] >= goodput * best]
    fast = [r for r in rows if r["p99_ms"] <= latency * u99]
    first = min(enough, key=lambda r: r["concurrency"])
    last = max(fast, key=lambda r: r["concurrency"]) if fast else None
    return {
        "best_ok_per_s": best,
        "fewest_for_goodput": first["concurrency"], "its_p99_x": first["p99_ms"] / u99,
        "most_within_latency": last["concurrency"] if last else None,
        "its_share_of_best": last["ok_per_s"] / best if last else 0.0,
        "both": any(r["ok_per_s"] >= goodput * best and r["p99_ms"] <= latency * u99 for r in rows),
    }


async def measure(address: str, payloads, args) -> dict:
    await warm_up(address, payloads, 20)
    unloaded = await open_loop(address, payloads, rate=args.unloaded_rps, duration_s=args.unloaded_duration,
                               timeout_s=args.timeout, seed=1)
    u50, u99 = percentiles_ms(unloaded.latency_s[np.array([c == "OK" for c in unloaded.codes])], (50, 99))
    maximum = await closed_loop(address, payloads, concurrency=args.concurrency, duration_s=args.max_duration,
                                timeout_s=args.timeout)
    max_ok_s = sum(c == "OK" for c in maximum.codes) / maximum.wall_s
    print(f"unloaded p50 {u50:.1f} ms p99 {u99:.1f} ms; maximum {max_ok_s:.1f} OK/s", flush=True)
    curve = await knee(address, payloads, args.knee, args.knee_duration, args.timeout) if args.knee else []
    sweep = []
    for factor in args.factors:
        sweep.append(await overload_at(address, payloads, args, factor, max_ok_s, u99))
        await asyncio.sleep(args.recovery_window)  # the next factor starts from an idle server
    return {
        "unloaded": {"p50_ms": u50, "p99_ms": u99, "codes": _codes(unloaded), "rps": args.unloaded_rps},
        "maximum": {"ok_per_s": max_ok_s, "concurrency": args.concurrency, "codes": _codes(maximum)},
        "overload": sweep,
        "knee": curve,
    }


def Monolith(package: Path, *, log_dir: Path, max_in_flight: int, front: str = "auto", extra: tuple[str, ...] = ()):
    """loadtest's MonolithServer with the admission bound, the front and the ``extra`` serve flags
    given (the load test runs 256 and no front)."""
    import os

    from loadtest.cpu import CpuMeter, process_tree
    from loadtest.targets import MonolithServer

    class _Server(MonolithServer):
        def __enter__(self):
            argv = [sys.executable, "-m", "recserve.cli", "serve", "--monolith", str(self.package), "--port",
                    str(self.port), "--max-in-flight", str(max_in_flight), "--feature-filter", "none",
                    "--front", front, *extra]
            self._spawn(argv, dict(os.environ))
            self.cpu = CpuMeter(lambda: process_tree(self.proc.pid) if self.proc else [])
            self.info = self._wait_ready(self.ready_timeout_s)
            return self

    return _Server(package, log_dir=log_dir)


def _rows(o: dict, max_ok_s: float, u99: float) -> list[tuple[str, str, str, bool]]:
    return [
        ("OK/s at overload vs maximum", f"{o['ok_per_s']:.1f} / {max_ok_s:.1f} = {o['ok_fraction_of_max'] * 100:.0f}%",
         ">= 90%", o["ok_fraction_of_max"] >= 0.9),
        ("admitted P99 vs unloaded P99", f"{_ms(o['admitted_p99_ms'])} / {_ms(u99)} ms = "
                                         f"{o['admitted_p99_ms'] / u99:.2f}x", "<= 2x", o["admitted_p99_ms"] <= 2 * u99),
        ("shed answered in (P50 / P99)", f"{_ms(o['shed_p50_ms'])} / {_ms(o['shed_p99_ms'])} ms", "<= 10 ms",
         not o["shed_p99_ms"] > 10),  # nothing shed: met
        ("recovery to the unloaded P99", f"{o['recovery_s']:.2f} s", "<= 2 s", o["recovery_s"] <= 2),
    ]


def table(target: str, r: dict) -> str:
    u99 = r["unloaded"]["p99_ms"]
    max_ok_s = r["maximum"]["ok_per_s"]
    lines = [
        f"### {target}: offered load against the maximum ({r['overload'][0]['duration_s']:.0f} s each, "
        f"{r['overload'][0]['timeout_s']:g} s deadlines)",
        "",
        f"unloaded ({r['unloaded']['rps']:g} req/s): P50 {_ms(r['unloaded']['p50_ms'])} ms, P99 {_ms(u99)} ms; "
        f"maximum (closed loop, {r['maximum']['concurrency']} workers): {max_ok_s:.1f} OK/s",
        "",
        "| offered | req/s | OK/s (of max) | admitted P50 / P99 ms | shed P99 ms | from the actual send: admitted "
        "/ shed P99 ms | the generator's lag, P99 ms | recovery s | codes |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for o in r["overload"]:
        lines.append(f"| {o['factor']:g}x | {o['offered_rps']:.1f} | {o['ok_per_s']:.1f} "
                     f"({o['ok_fraction_of_max'] * 100:.0f}%) | {_ms(o['admitted_p50_ms'])} / "
                     f"{_ms(o['admitted_p99_ms'])} | {_ms(o['shed_p99_ms'])} | "
                     f"{_ms(o['admitted_p99_sent_ms'])} / {_ms(o['shed_p99_sent_ms'])} | "
                     f"{_ms(o['sender_lag_p99_ms'])} | {o['recovery_s']:.2f} | {o['codes']} |")
    if r.get("knee"):
        k = knee_summary(r["knee"], u99)
        lines += ["", f"the curve under it (closed loop, {len(r['knee'])} depths): what each number in flight answers",
                  "", "| in flight | OK/s | of the best | P50 ms | P90 ms | P99 ms | P99 / unloaded P99 |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {c['concurrency']} | {c['ok_per_s']:.1f} | {c['ok_per_s'] / k['best_ok_per_s'] * 100:.0f}% | "
                  f"{_ms(c['p50_ms'])} | {_ms(c['p90_ms'])} | {_ms(c['p99_ms'])} | {c['p99_ms'] / u99:.2f}x |"
                  for c in r["knee"]]
        within = (f"the most in flight within 2x the unloaded P99: {k['most_within_latency']}, answering "
                  f"{k['its_share_of_best'] * 100:.0f}% of it" if k["most_within_latency"] else
                  "no depth kept the P99 within 2x the unloaded")
        lines += ["", f"- 90% of the best ({k['best_ok_per_s']:.1f} OK/s) needs {k['fewest_for_goodput']} in flight, "
                      f"at a P99 of {k['its_p99_x']:.2f}x the unloaded; {within}.",
                  f"- one depth meeting both: {'yes' if k['both'] else '**none** on this machine'}"]
    for o in r["overload"]:
        lines += ["", f"{o['factor']:g}x against the targets:", "", "| figure | measured | target | met |",
                  "| --- | ---: | ---: | --- |"]
        lines += [f"| {name} | {value} | {goal} | {'yes' if met else '**no**'} |"
                  for name, value, goal, met in _rows(o, max_ok_s, u99)]
    return "\n".join(lines) + "\n"


def plot(target: str, r: dict, path: Path) -> None:
    """Goodput (OK/s) and admitted P99 against offered load, with the targets drawn in; skipped,
    saying so, where matplotlib is not installed (the GPU host's image lacks it)."""
    try:
        import matplotlib
    except ImportError:
        print(f"overload: no plot ({path.name}): matplotlib is not installed here")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o = r["overload"]
    x = [s["factor"] for s in o]
    max_ok_s, u99 = r["maximum"]["ok_per_s"], r["unloaded"]["p99_ms"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    a.plot(x, [s["ok_per_s"] for s in o], marker="o", label="OK/s")
    a.axhline(max_ok_s, color="gray", ls="--", label="maximum (closed loop)")
    a.axhline(0.9 * max_ok_s, color="red", ls=":", label="target: 90% of the maximum")
    a.set_ylabel("goodput, OK/s")
    a.legend(fontsize=8)
    b.plot(x, [s["admitted_p99_ms"] for s in o], marker="o", label="admitted P99")
    b.axhline(2 * u99, color="red", ls=":", label="target: 2x the unloaded P99")
    b.set_ylabel("ms")
    b.set_xlabel("offered load, x the maximum")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"overload, {target}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("monolith", "serve"), default="monolith")
    p.add_argument("--package", default="default", help="model package (default: the default model)")
    p.add_argument("--address", default=None, help="an already running server (skips starting one)")
    p.add_argument("--factors", default="1,2,3,5", help="offered loads, comma-separated multiples of the maximum")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    p.add_argument("--timeout", type=float, default=1.0, help="request deadline, seconds")
    p.add_argument("--unloaded-rps", type=float, default=5.0)
    p.add_argument("--unloaded-duration", type=float, default=12.0)
    p.add_argument("--max-duration", type=float, default=12.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--knee", default="", help="numbers in flight for the closed-loop curve, comma-separated "
                                             "(e.g. 1,2,4,8,16; default: none)")
    p.add_argument("--knee-duration", type=float, default=8.0, help="seconds per depth of --knee")
    p.add_argument("--recovery-window", type=float, default=6.0)
    p.add_argument("--requests", type=int, default=200, help="distinct requests in the trace")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overload")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for recserve serve")
    p.add_argument("--max-in-flight", type=int, default=16, help="the monolith's admission bound")
    p.add_argument("--front", choices=("auto", "haproxy", "none"), default="auto",
                   help="the server's --front (default auto: HAProxy where installed, as recserve serve; "
                        "a --serve-arg=--front=... still wins for the stack)")
    args = p.parse_args(argv)
    try:
        args.factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        p.error(f"--factors: comma-separated numbers, not {args.factors!r}")
    if not args.factors or min(args.factors) <= 0:
        p.error("--factors: every factor must be > 0")
    try:
        args.knee = [int(c) for c in args.knee.split(",")] if args.knee else []
    except ValueError:
        p.error(f"--knee: comma-separated whole numbers, not {args.knee!r}")
    if args.knee and min(args.knee) < 1:
        p.error("--knee: every depth must be at least 1")

    from loadtest.targets import ServeStack
    from loadtest.trace import make_trace
    from recserve.package import ModelPackage
    from recserve.default_package import resolve_package

    package = resolve_package(args.package)
    workload = ModelPackage.open(package).manifest.workload
    trace = make_trace(workload, args.requests, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.address:
        result = asyncio.run(measure(args.address, trace.payloads, args))
    else:
        server = (Monolith(package, log_dir=args.out, max_in_flight=args.max_in_flight, front=args.front,
                            extra=tuple(args.serve_arg)) if args.target == "monolith"
                  else ServeStack(package, name="overload", log_dir=args.out,
                                  extra_args=("--front", args.front, *args.serve_arg)))
        with server:
            result = asyncio.run(measure(server.address, trace.payloads, args))
    result["target"] = args.target
    result["package"] = str(package)
    text = table(args.target, result)
    print(text)
    (args.out / f"overload-{args.target}.md").write_text(text)
    (args.out / f"overload-{args.target}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    plot(args.target, result, args.out / f"overload-{args.target}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
