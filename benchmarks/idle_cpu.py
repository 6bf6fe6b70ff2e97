"""What a `recserve serve` stack costs with no request at all: CPU ms per second of every process
of its tree (Ray's GCS, raylet, dashboard, Serve's controller and proxy, the replicas), measured
over ``--seconds`` once it serves. At a low request rate this idle cost is most of a request's
CPU (docs/dataplane.md: CPU per request at 10 req/s).

    RAY_AUTH_MODE=token .venv/bin/python benchmarks/idle_cpu.py \\
        artifacts/bench/criteo-kaggle-rows100000-fp32/packages/load-2 --seconds 30 [-- SERVE FLAGS]

Serve's own settings come from the environment (recserve serve sets RAY_SERVE_METRICS_EXPORT_INTERVAL_MS
unless it is set): set them here to compare.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.cpu import cpu_by_process, process_tree  # noqa: E402
from loadtest.targets import ServeStack  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--seconds", type=float, default=30.0, help="the measured idle window")
    ap.add_argument("--settle", type=float, default=20.0, help="seconds to wait after the stack serves")
    ap.add_argument("serve_args", nargs="*", help="more `recserve serve` flags (after --; the feature filter is "
                                                  "none unless one is named, as in the bench)")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="idle-cpu-"))
    # the user's `recserve serve`: Ray's own metrics report interval, 10 s (ServeStack shortens it
    # for the bench's stage histograms), its state file apart from any running stack's
    env = {"RECSERVE_ARTIFACTS": str(state), "RAY_metrics_report_interval_ms": "10000"}
    started = time.monotonic()
    with ServeStack(Path(args.package), name="idle", log_dir=state, env=env, extra_args=tuple(args.serve_args),
                    ready_timeout_s=600) as stack:
        print(f"serving after {time.monotonic() - started:.0f} s (log {stack.log_path}); settling "
              f"{args.settle:.0f} s, then measuring {args.seconds:.0f} s", flush=True)
        time.sleep(args.settle)
        before = cpu_by_process(process_tree(stack.proc.pid))
        time.sleep(args.seconds)
        after = cpu_by_process(process_tree(stack.proc.pid))
    rows = sorted(((after[pid][1] - before[pid][1]) / args.seconds * 1000, after[pid][0][:80])
                  for pid in after if pid in before)
    print(f"{'CPU ms/s':>9}  process")
    for ms, name in reversed(rows):
        print(f"{ms:9.1f}  {name}")
    print(f"{sum(ms for ms, _ in rows):9.1f}  total over {len(rows)} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
