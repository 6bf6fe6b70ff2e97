"""benchmarks/overload.py's knee summary: which depth reaches the goodput target, which keeps the
latency target, and whether one does both (a curve as measured on 2 cores, and one that allows it)."""

import subprocess
import sys
from pathlib import Path

from benchmarks.overload import knee_summary

ROOT = Path(__file__).resolve().parents[2]


def _rows(points):
    return [{"concurrency": c, "ok_per_s": ok, "p99_ms": p99} for c, ok, p99 in points]


def test_a_curve_whose_throughput_needs_more_in_flight_than_its_latency_allows_meets_no_target_pair():
    # 2 cores, the default stack (2026-12-07): throughput rises to 8-16 in flight, the P99 from 2
    rows = _rows([(1, 74.2, 25.3), (2, 85.6, 37.3), (3, 104.4, 45.5), (4, 112.4, 57.3), (6, 144.8, 65.2),
                  (8, 165.7, 71.6), (12, 159.4, 175.9), (16, 182.5, 145.7)])
    k = knee_summary(rows, u99=25.3)
    assert k["best_ok_per_s"] == 182.5
    assert k["fewest_for_goodput"] == 8 and abs(k["its_p99_x"] - 71.6 / 25.3) < 1e-9  # 165.7 >= 0.9 x 182.5
    assert k["most_within_latency"] == 3 and abs(k["its_share_of_best"] - 104.4 / 182.5) < 1e-9
    assert not k["both"]


def test_a_curve_that_saturates_early_has_a_depth_meeting_both():
    rows = _rows([(1, 100.0, 20.0), (2, 190.0, 24.0), (4, 200.0, 38.0), (8, 201.0, 80.0)])
    k = knee_summary(rows, u99=20.0)
    assert k["fewest_for_goodput"] == 2 and k["most_within_latency"] == 4 and k["both"]


def test_no_depth_within_the_latency_bound_is_said_so():
    k = knee_summary(_rows([(1, 10.0, 50.0), (2, 20.0, 90.0)]), u99=20.0)
    assert k["most_within_latency"] is None and k["its_share_of_best"] == 0.0 and not k["both"]


def test_a_bad_knee_flag_is_refused_naming_it():
    run = subprocess.run([sys.executable, "benchmarks/overload.py", "--knee", "1,two"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--knee: comma-separated whole numbers" in run.stderr
    run = subprocess.run([sys.executable, "benchmarks/overload.py", "--knee", "0,4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--knee: every depth must be at least 1" in run.stderr
