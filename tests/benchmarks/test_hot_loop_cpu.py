"""benchmarks/hot_loop_cpu.py runs on a sharded package as its docstring says and prints a
positive time for each stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_hot_loop_benchmark_prints_each_stage(tiny_packages):
    run = subprocess.run([sys.executable, "benchmarks/hot_loop_cpu.py", str(tiny_packages("table-2")),
                          "--workload", "tiny", "--batch", "17", "--reps", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1]) for line in run.stdout.splitlines()[3:] if line.strip()}
    assert set(rows) == {"shards' lookups, float16 out (sum)", "tower: assemble [B, F, D] from the parts",
                         "tower: score", "monolith: lookups + assemble + score"}, run.stdout
    assert all(ms > 0 for ms in rows.values()), rows
