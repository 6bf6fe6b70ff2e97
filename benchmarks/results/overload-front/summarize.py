"""Summarize the runs here (each RUN/overload-*.json) into one table: python3 summarize.py [DIR]
(DIR: another directory of runs, e.g. ../overload-front-stack)."""
import json
import re
import sys
from pathlib import Path

HERE = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else Path(__file__).resolve().parent
rows = []
for run in sorted(HERE.iterdir()):
    found = sorted(run.glob("overload-*.json")) if run.is_dir() else []
    if not found:
        continue
    j = found[0]
    d = json.loads(j.read_text())
    m = re.search(r"if(\d+)", run.name)
    in_flight = m.group(1) if m else "32"
    log = HERE / f"{run.name}.server.log"
    if not log.is_file():  # the benchmark started the server itself: its log is in the run's directory
        log = next(run.glob("*.log"), log)
    front = "HAProxy" if log.is_file() and "front (HAProxy)" in log.read_text() else "none"
    for o in d["overload"]:
        codes = o.get("codes", {})
        rows.append((run.name, front, in_flight, f"{o['factor']:g}x", f"{o['ok_per_s']:.1f} ({o['ok_fraction_of_max'] * 100:.0f}%)",
                     f"{o.get('admitted_p99_sent_ms', float('nan')):.0f}", f"{o.get('shed_p99_sent_ms', float('nan')):.1f}",
                     f"{o.get('sender_lag_p99_ms', float('nan')):.1f}", str(codes.get("DEADLINE_EXCEEDED", 0))))
print("| run | front | --max-in-flight | offered | OK/s (of its maximum) | admitted P99 ms (from send) | shed P99 ms (from send) | generator's lag P99 ms | DEADLINE_EXCEEDED |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
