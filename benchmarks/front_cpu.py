"""What the monolith's HAProxy front costs: CPU per request and latency, with and without it.

    .venv/bin/python benchmarks/front_cpu.py [PACKAGE] --rates 10,50,100 --duration 15 \
        --out benchmarks/results/overload-front/cpu.txt

For each front (``--front none`` and ``--front haproxy``) one ``recserve serve --monolith`` is
started (the benchmark's own processes, not pinned), and for each rate an open loop runs for
``--duration`` s (the default package's trace, 1 s deadlines). Per row: OK answers, P50/P99 ms,
and CPU ms per OK answer of the Python server, of HAProxy and of both (loadtest.cpu's meter of the
process tree, split by its roles "server" and "haproxy").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.driver import open_loop, warm_up  # noqa: E402
from loadtest.stats import percentiles_ms  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", nargs="?", default="default")
    p.add_argument("--rates", default="10,50,100")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--requests", type=int, default=500, help="trace size")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    from loadtest.trace import make_trace
    from loadtest.targets import MonolithServer
    from recserve.default_package import resolve_package
    from recserve.package import ModelPackage

    package = resolve_package(args.package)
    trace = make_trace(ModelPackage.open(package).manifest.workload, args.requests, seed=0)
    lines = [f"package {package}; open loop {args.duration:g} s per rate, 1 s deadlines",
             f"{'front':>8} {'rate/s':>7} {'OK':>6} {'P50 ms':>7} {'P99 ms':>7} {'server ms/req':>14} "
             f"{'haproxy ms/req':>15} {'total ms/req':>13}"]
    print("\n".join(lines), flush=True)
    for front in ("none", "haproxy"):
        log_dir = Path(tempfile.mkdtemp(prefix=f"front-cpu-{front}-"))
        # MonolithServer's argv says --front none; a later --front wins
        with MonolithServer(package, log_dir=log_dir, extra_args=("--front", front)) as server:
            asyncio.run(warm_up(server.address, trace.payloads, 20))
            for rate in rates:
                before = server.cpu.read_by_role()
                rec = asyncio.run(open_loop(server.address, trace.payloads, rate=rate, duration_s=args.duration,
                                            timeout_s=1.0))
                after = server.cpu.read_by_role()
                ok = max(1, sum(c == "OK" for c in rec.codes))
                lat = rec.latency_s[[c == "OK" for c in rec.codes]]
                p50, p99 = percentiles_ms(lat, (50, 99))
                srv, hap = ((after.get(k, 0.0) - before.get(k, 0.0)) * 1e3 / ok for k in ("server", "haproxy"))
                line = (f"{front:>8} {rate:>7g} {ok:>6} {p50:>7.1f} {p99:>7.1f} {srv:>14.2f} {hap:>15.2f} "
                        f"{srv + hap:>13.2f}")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
