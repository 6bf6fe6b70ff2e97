"""A short headless locust run (own process, as it must be) against the monolith."""

import csv
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"


def _locust(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _stats(prefix: Path) -> dict:
    with open(f"{prefix}_stats.csv") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_headless_locust_run_records_successful_grpc_requests(monolith, tmp_path):
    res = _locust(
        ["-u", "3", "-r", "3", "--run-time", "10s", "--host", monolith, "--workload", "tiny",
         "--csv", str(tmp_path / "run")],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    row = _stats(tmp_path / "run")["Predict"]
    assert row["Type"] == "grpc"
    assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0
    assert float(row["Average Content Size"]) > 0  # response length is reported


def test_locust_stops_by_itself_after_max_requests(monolith, tmp_path):
    res = _locust(
        ["-u", "2", "-r", "2", "--host", f"grpc://{monolith}", "--workload", "tiny", "--max-requests", "30",
         "--csv", str(tmp_path / "capped")],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(_stats(tmp_path / "capped")["Predict"]["Request Count"]) == 30
