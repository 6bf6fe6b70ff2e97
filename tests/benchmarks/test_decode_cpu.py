"""benchmarks/decode_cpu.py runs as its docstring says and prints a row per workload."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_decode_benchmark_prints_a_row_per_workload():
    run = subprocess.run([sys.executable, "benchmarks/decode_cpu.py", "--workloads", "tiny,criteo-kaggle",
                          "--requests", "4", "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"tiny", "criteo-kaggle"}
    for name, cells in rows.items():
        assert len(cells) == 6 and all(float(c) > 0 for c in cells), (name, cells)
