"""A GPU host has no torchrec: random export, `recserve serve PACKAGE` (the monolith and the
Ray Serve stack, every replica) and serving itself run with torchrec's import blocked in every
process (tests/no_torchrec/sitecustomize.py), and score as the torchrec model of the package.
Serving never trains: a missing default package fails and names the command that makes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.serving.package_models import torchrec_scores

from recserve.synth import TrafficGenerator
from serving.api.client import RankingClient

ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "tests" / "no_torchrec"
TOL = 1e-5


@pytest.fixture
def no_torchrec(tmp_path):
    """(env, log): an environment whose Python processes cannot import torchrec, and the log
    of the processes that ran the guard and of any import it blocked."""
    log = tmp_path / "no-torchrec.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(GUARD), str(ROOT)]), RECSERVE_NO_TORCHREC_LOG=str(log),
               RECSERVE_ARTIFACTS=str(tmp_path / "artifacts"), RAY_USAGE_STATS_ENABLED="0")
    return env, log


def _recserve(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recserve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _random_package(env, out: Path) -> Path:
    r = _recserve(env, "export", "--init", "random", "--seed", "4", "--workload", "tiny", "--dtype", "fp16",
                  "--strategy", "load", "--shards", "2", "--shard-memory", "100000", "--threads", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _serve_and_score(env, package: Path, args: list[str], port: int, timeout: float) -> np.ndarray:
    """Start `recserve serve PACKAGE ARGS`, score a batch through it, stop it with SIGTERM."""
    from recserve.package import ModelPackage

    manifest = ModelPackage.open(package).manifest
    batch = TrafficGenerator(manifest.workload, seed=5, empty_bag_fraction=0.2).batch(33)
    server = subprocess.Popen([sys.executable, "-m", "recserve.cli", "serve", str(package), "--port", str(port), *args],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with RankingClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(manifest.name, manifest.version, timeout=timeout)
            got = client.predict(batch.dense, {f: (b.values, b.lengths) for f, b in batch.sparse.items()}, timeout=60)
    except BaseException as e:
        raise AssertionError(f"the server did not serve: {e}\n{_stop(server)}") from e
    out = _stop(server)
    assert server.returncode == 0, out
    np.testing.assert_allclose(got, torchrec_scores(package, batch), rtol=0, atol=TOL)
    return got


def _stop(server: subprocess.Popen) -> str:
    """SIGTERM (Serve and Ray shut down), SIGKILL if that takes over two minutes; the output."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        server.kill()
        return server.communicate()[0]


def _blocked(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("torchrec")]


def test_the_guard_does_block_torchrec(no_torchrec):
    env, log = no_torchrec
    r = subprocess.run([sys.executable, "-c", "import torchrec"], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "blocked" in r.stderr
    assert _blocked(log)


def test_random_export_and_the_monolith_need_no_torchrec(no_torchrec, tmp_path):
    from serving.ops.ports import free_port

    env, log = no_torchrec
    package = _random_package(env, tmp_path / "pkg")
    _serve_and_score(env, package, ["--monolith"], free_port(), timeout=120)
    assert _blocked(log) == []
    assert sum(line.startswith("guard") for line in log.read_text().splitlines()) >= 2  # export and server ran it


@pytest.mark.slow
def test_the_ray_serve_stack_needs_no_torchrec_in_any_replica(no_torchrec, tmp_path):
    from serving.ops.ports import free_port

    env, log = no_torchrec
    package = _random_package(env, tmp_path / "pkg")
    _serve_and_score(env, package, ["--dashboard-port", str(free_port()), "--http-port", str(free_port()),
                                    "--wire-dtype", "float32"],  # fp32 between deployments: scores to 1e-5
                     free_port(), timeout=600)
    assert _blocked(log) == []
    workers = [line for line in log.read_text().splitlines() if line.startswith("guard") and "default_worker" in line]
    assert len(workers) >= 4  # router, two shards and the tower ran the guard too


def test_serving_a_missing_default_package_fails_and_names_the_command_that_makes_it(no_torchrec):
    from serving.ops.ports import free_port

    env, log = no_torchrec
    for extra in (["--monolith"], []):
        r = _recserve(env, "serve", "--port", str(free_port()), "--dashboard-port", str(free_port()),
                      "--http-port", str(free_port()), *extra, timeout=120)
        assert r.returncode == 2
        assert "recserve default-package" in r.stderr and "not built" in r.stderr
    assert not (Path(env["RECSERVE_ARTIFACTS"]) / "default").exists()  # nothing was trained


def test_recserve_bench_on_random_weights_needs_no_torchrec(no_torchrec, tmp_path):
    env, log = no_torchrec
    r = _recserve(env, "bench", "--init", "random", "--workload", "tiny", "--max-rows", "0", "--configs", "monolith",
                  "--rates", "10", "--duration", "1", "--closed-concurrency", "0", "--trace-size", "20",
                  "--warmup", "2", "--artifacts", str(tmp_path / "a"), "--out", str(tmp_path / "out"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--init random" in r.stdout  # the package was written by random export, not trained
    assert (tmp_path / "out" / "bench.csv").is_file()
    assert _blocked(log) == []
