"""The distillation pipeline as an operator runs it, every step a `recserve` process on the
ExFM world: serve (the monolith, logging every request) -> teacher score (Ray Data) -> synth
labels (one vertical of the ExFM world) -> train --distill (AH + SA) -> export."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recserve.synth import ExFMWorld
from serving.api.client import RankingClient
from serving.ops.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400.0


def _recserve(env: dict, *args: str, timeout: float = 600) -> str:
    r = subprocess.run([sys.executable, "-m", "recserve.cli", *args], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"recserve {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _serve_and_log(env: dict, package: Path, log_dir: Path, batches: list) -> None:
    """A monolith logging every request; the batches sent to it; stopped by SIGTERM (the log flushes)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "recserve.cli", "serve", str(package), "--monolith",
                               "--port", str(port), "--feature-filter", "none", "--log-rate", "1",
                               "--log-dir", str(log_dir), "--log-flush-s", "0.2"],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with RankingClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving("tiny", timeout=300)
            for i, b in enumerate(batches):
                client.predict(b.dense, {f: (x.values, x.lengths) for f, x in b.sparse.items()},
                               request_id=f"v1-{i}", timeout=60)
    finally:
        server.send_signal(signal.SIGTERM)
        out = server.communicate(timeout=120)[0]
    assert server.returncode == 0, out


@pytest.mark.timeout(900)  # six processes, one of them starting Ray: ~2 min idle, 5+ at load average 60
def test_serve_log_teacher_labels_and_distill_run_end_to_end_on_the_exfm_world(tmp_path, tiny, tiny_packages) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(tmp_path / "artifacts"),
               RAY_USAGE_STATS_ENABLED="0")
    world = ExFMWorld(tiny, seed=0)
    traffic = world.traffic(1, 10, 480)[0]  # the v1-low student's traffic, 6 requests of 80
    _serve_and_log(env, tiny_packages("singular-1"), tmp_path / "log",
                   [traffic.take(list(range(i, i + 80))) for i in range(0, 480, 80)])
    assert pq.read_table(tmp_path / "log").num_rows == 480

    now = time.time()
    out = _recserve(env, "teacher", "score", "--logs", str(tmp_path / "log"), "--teacher",
                    str(tiny_packages("table-2")), "--out", str(tmp_path / "scores"), "--batch-size", "160",
                    "--snapshot-at", str(now - 2 * DAY))
    assert "480 logged examples: 480 unique scored" in out, out
    assert re.search(r"scoring [\d.]+s \([\d,]+ examples/s\) after a start-up of [\d.]+s", out), out

    day_zero = now - 10.5 * DAY  # the log falls on the world's day 10
    out = _recserve(env, "synth", "labels", "--logs", str(tmp_path / "log"), "--out", str(tmp_path / "labels"),
                    "--workload", "tiny", "--world", "exfm", "--vertical", "v1-low", "--day-zero", str(day_zero))
    assert "480 examples labelled by the ExFM world's vertical v1-low on days 10 to 10" in out, out

    out = _recserve(env, "train", "--workload", "tiny", "--labels", str(tmp_path / "labels"), "--distill",
                    str(tmp_path / "scores"), "--adapter", "affine", "--aux-weight", "0.5", "--grad-scale", "0.5",
                    "--batch-size", "96", "--out", str(tmp_path / "student.pt"))
    assert "gradient scale 0.5 into the shared layers; loss weight 0.5, label scale 1; adapter affine" in out, out
    assert "480 logged examples (480 with a teacher score): 5 steps" in out, out
    _recserve(env, "export", "--workload", "tiny", "--state-dict", str(tmp_path / "student.pt"), "--out",
              str(tmp_path / "student-pkg"))
    assert "ok: checksums" in _recserve(env, "inspect", str(tmp_path / "student-pkg"))
