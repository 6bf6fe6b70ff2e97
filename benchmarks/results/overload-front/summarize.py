"""Summarize the runs here (each RUN/overload-monolith.json) into one table: python3 summarize.py"""
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows = []
for run in sorted(HERE.iterdir()):
    j = run / "overload-monolith.json"
    if not j.is_file():
        continue
    d = json.loads(j.read_text())
    m = re.search(r"if(\d+)", run.name)
    in_flight = m.group(1) if m else "32"
    front = "HAProxy" if "front (HAProxy)" in (HERE / f"{run.name}.server.log").read_text() else "none"
    for o in d["overload"]:
        codes = o.get("codes", {})
        rows.append((run.name, front, in_flight, f"{o['factor']:g}x", f"{o['ok_per_s']:.1f} ({o['ok_fraction_of_max'] * 100:.0f}%)",
                     f"{o.get('admitted_p99_sent_ms', float('nan')):.0f}", f"{o.get('shed_p99_sent_ms', float('nan')):.1f}",
                     str(codes.get("DEADLINE_EXCEEDED", 0))))
print("| run | front | --max-in-flight | offered | OK/s (of its maximum) | admitted P99 ms (from send) | shed P99 ms (from send) | DEADLINE_EXCEEDED |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
