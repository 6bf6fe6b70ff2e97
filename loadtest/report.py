"""Benchmark output: a CSV of every row, a PNG plot (P99 vs offered load) and a table."""

from __future__ import annotations

import csv
import math
from dataclasses import fields
from pathlib import Path

from loadtest.stats import RunSummary

COLUMNS = tuple(f.name for f in fields(RunSummary))

# For scale beside every table: MLPerf Inference v5.0, DLRMv2 (99.9%), server scenario, one
# H200: 73.1k samples/s of ~270 user-item pairs each at P99 <= 60 ms (TensorRT, int8, no
# network) = ~19.7M examples/s per GPU
MLPERF_H200_EXAMPLES_PER_S = 19.7e6


def write_csv(rows: list[RunSummary], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(v) for k, v in r.as_dict().items()})
    return path


def read_csv(path: Path) -> list[RunSummary]:
    """Rows written by :func:`write_csv` (to re-plot or re-table a finished run)."""
    types = {f.name: f.type for f in fields(RunSummary)}
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            kw = {}
            for k, v in raw.items():
                t = types[k]
                if t in ("float", float):
                    kw[k] = float(v) if v != "" else float("nan")
                elif t in ("int", int):
                    kw[k] = int(v)
                else:
                    kw[k] = v
            out.append(RunSummary(**kw))
    return out


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def plot_p99(rows: list[RunSummary], path: Path, *, title: str = "") -> Path:
    """P99 latency vs offered load, one line per configuration (open-loop rows), as a PNG."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = p99_figure(rows, title=title)
    fig.savefig(path)
    plt.close(fig)
    return path


def p99_figure(rows: list[RunSummary], *, title: str = ""):
    """The matplotlib Figure :func:`plot_p99` saves: one line per configuration, labelled
    with its name, through its (offered req/s, P99 ms) points; configurations with no
    finite P99 are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    configs = list(dict.fromkeys(r.config for r in rows if r.mode == "open"))
    for cfg in configs:
        pts = sorted((r.offered_rps, r.p99_ms) for r in rows if r.config == cfg and r.mode == "open")
        pts = [(x, y) for x, y in pts if not math.isnan(y)]
        if not pts:
            continue
        style = dict(lw=2.5, color="black") if cfg == "monolith" else dict(lw=1.3)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=cfg, **style)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("P99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "P99 latency vs offered load")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


_TABLE = (
    ("config", "config", "{}"),
    ("mode", "mode", "{}"),
    ("offered", "offered_rps", "{:.0f}"),
    ("tput/s", "throughput_rps", "{:.1f}"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p95 ms", "p95_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("ok", "ok", "{}"),
    ("errors", "errors", "{}"),
    ("calls/req", "shard_calls_per_req", "{:.2f}"),
    ("req KB", "req_bytes_per_req", "{:.1f}"),
    ("intern KB", "internal_bytes_per_req", "{:.1f}"),
    ("cpu ms/req", "cpu_ms_per_req", "{:.2f}"),
    ("cpu x mono", "cpu_overhead", "{:.2f}"),
    ("of it idle", "idle_ms_per_req", "{:.2f}"),
    ("load", "loadavg_1m", "{:.1f}"),
    ("gpu %", "gpu_util", "{:.0f}"),
    ("cpu ms/req by process", "cpu_by_process", "{}"),
)


def _cell(r: RunSummary, attr: str, fmt: str) -> str:
    v = getattr(r, attr)
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if attr == "offered_rps" and r.mode == "closed":
        return f"c={r.concurrency}"
    if attr.endswith("bytes_per_req"):
        v = v / 1024
    return fmt.format(v) if v != "" else "-"


def format_table(rows: list[RunSummary], *, markdown: bool = False) -> str:
    head = [h for h, _, _ in _TABLE]
    body = [[_cell(r, a, f) for _, a, f in _TABLE] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)])
