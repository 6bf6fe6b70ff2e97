"""The Router's own gRPC server (serving/app/grpc_ingress.py), with real gRPC on 127.0.0.1 and
no Ray: servers share one port and the kernel spreads connections over them; the door
holds max_in_flight calls, queues max_queued, refuses the rest at once; a stopping server
finishes its calls in flight."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from recserve.v1 import ranker_pb2, ranker_pb2_grpc
from serving.app.grpc_ingress import start_ingress
from serving.ops.ports import free_port


def _handlers(name: str, *, hold: asyncio.Event | None = None, started: list | None = None):
    async def predict(request, context):
        if started is not None:
            started.append(request.request_id)
        if hold is not None:
            await hold.wait()
        return ranker_pb2.PredictResponse(request_id=request.request_id, version=name)

    async def model_info(request, context):
        return ranker_pb2.ModelInfoResponse(version=name)

    async def check(request, context):
        from grpc_health.v1 import health_pb2

        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    return {"predict": predict, "model_info": model_info, "check": check}


def _channel(address: str) -> grpc.aio.Channel:
    # a pool of its own: channels to one address otherwise share one connection
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def test_routers_share_one_port_and_the_kernel_spreads_connections_over_them():
    async def run() -> set[str]:
        address = f"127.0.0.1:{free_port()}"
        servers = [start_ingress(address, **_handlers(f"router-{i}"), max_in_flight=4, max_queued=4) for i in range(2)]
        answered = set()
        try:
            for i in range(24):  # each connection lands on one of the two: all on one is 2 in 2^24
                async with _channel(address) as ch:
                    reply = await ranker_pb2_grpc.RankerStub(ch).Predict(
                        ranker_pb2.PredictRequest(request_id=str(i)), timeout=10)
                    answered.add(reply.version)
        finally:
            await asyncio.gather(*(s.stop(None) for s in servers))
        return answered

    assert asyncio.run(run()) == {"router-0", "router-1"}


def test_routers_on_own_addresses_each_take_a_free_one_beside_the_held_port_and_the_last_is_refused():
    """Behind a front each router takes the first free of 127.0.1.1..N on one port (held by
    `recserve serve` on 127.0.0.1 meanwhile) and answers there alone; with all N taken the next
    is refused naming every address it tried."""
    from serving.config import own_addresses
    from serving.ops.ports import hold_for_reuseport

    port = free_port()
    candidates = own_addresses(port, 2)

    async def run() -> list[str]:
        servers = [start_ingress(candidates, **_handlers(f"router-{i}"), max_in_flight=1, max_queued=1)
                   for i in range(2)]
        try:
            with pytest.raises(OSError, match=", ".join(candidates)):
                start_ingress(candidates, **_handlers("third"), max_in_flight=1, max_queued=1)
            answered = []
            for address in candidates:
                async with _channel(address) as ch:
                    answered.append((await ranker_pb2_grpc.RankerStub(ch).Predict(
                        ranker_pb2.PredictRequest(), timeout=10)).version)
            return answered
        finally:
            await asyncio.gather(*(s.stop(None) for s in servers))

    with hold_for_reuseport(port):
        assert asyncio.run(run()) == ["router-0", "router-1"]


def test_a_port_held_without_so_reuseport_is_refused_naming_it():
    import socket

    async def run(port: int) -> None:
        start_ingress(f"127.0.0.1:{port}", **_handlers("r"), max_in_flight=1, max_queued=1)

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            asyncio.run(run(port))


def test_a_port_held_for_the_routers_keeps_others_out_and_lets_the_routers_in():
    """recserve serve holds its --port while Ray starts (serving/ops/ports.py hold_for_reuseport):
    a server binding without SO_REUSEPORT, or the kernel's choice of a free port, cannot take it;
    the Routers' servers (SO_REUSEPORT) bind beside it and answer."""
    import socket

    from serving.ops.ports import hold_for_reuseport, port_is_free

    async def run(address: str) -> str:
        server = start_ingress(address, **_handlers("router"), max_in_flight=1, max_queued=1)
        try:
            async with _channel(address) as ch:
                return (await ranker_pb2_grpc.RankerStub(ch).Predict(ranker_pb2.PredictRequest(), timeout=10)).version
        finally:
            await server.stop(None)

    port = free_port()
    with hold_for_reuseport(port):
        assert not port_is_free(port)
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        assert asyncio.run(run(f"127.0.0.1:{port}")) == "router"
    assert port_is_free(port)


def test_the_door_works_max_in_flight_queues_max_queued_and_refuses_the_rest_at_once():
    in_flight, queued, extra = 2, 3, 6

    async def run():
        address = f"127.0.0.1:{free_port()}"
        hold, started = asyncio.Event(), []
        server = start_ingress(address, **_handlers("r", hold=hold, started=started),
                               max_in_flight=in_flight, max_queued=queued)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = ranker_pb2_grpc.RankerStub(ch)
                await ch.channel_ready()
                waiting = [asyncio.ensure_future(stub.Predict(ranker_pb2.PredictRequest(request_id=f"w{i}"), timeout=30))
                           for i in range(in_flight + queued)]
                while len(started) < in_flight:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)  # the queued ones reach the door
                refused_at = time.monotonic()
                codes = []
                for i in range(extra):
                    try:
                        await stub.Predict(ranker_pb2.PredictRequest(request_id=f"x{i}"), timeout=30)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code().name)
                refused_s = time.monotonic() - refused_at
                health = await stub.ModelInfo(ranker_pb2.ModelInfoRequest(), timeout=5)  # control calls still pass
                running = len(started)
                hold.set()
                replies = await asyncio.gather(*waiting)
        finally:
            await server.stop(None)
        return codes, refused_s, health.version, running, [r.request_id for r in replies]

    codes, refused_s, info, running, replies = asyncio.run(run())
    assert codes == ["RESOURCE_EXHAUSTED"] * extra
    assert refused_s < 2.0  # never held: refused as they arrive
    assert info == "r"
    assert running == in_flight  # the queued ones waited for a slot
    assert sorted(replies) == sorted(f"w{i}" for i in range(in_flight + queued))


def test_a_stopping_router_finishes_its_calls_in_flight_and_takes_no_new_ones():
    async def run():
        address = f"127.0.0.1:{free_port()}"
        hold, started = asyncio.Event(), []
        server = start_ingress(address, **_handlers("r", hold=hold, started=started), max_in_flight=4, max_queued=4)
        async with grpc.aio.insecure_channel(address) as ch:
            stub = ranker_pb2_grpc.RankerStub(ch)
            call = asyncio.ensure_future(stub.Predict(ranker_pb2.PredictRequest(request_id="a"), timeout=30))
            while not started:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(server.stop(10))
            await asyncio.sleep(0.2)
            hold.set()
            reply = await call
            await stopping
        async with grpc.aio.insecure_channel(address) as ch:
            try:
                await ranker_pb2_grpc.RankerStub(ch).Predict(ranker_pb2.PredictRequest(request_id="b"), timeout=2)
                after = "OK"
            except grpc.aio.AioRpcError as e:
                after = e.code().name
        return reply.request_id, after

    first, after = asyncio.run(run())
    assert first == "a"
    assert after in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_the_door_reports_the_mean_of_its_calls_working_and_waiting_since_the_last_report():
    async def run() -> tuple[float, float]:
        address = f"127.0.0.1:{free_port()}"
        hold, started = asyncio.Event(), []
        ingress = start_ingress(address, **_handlers("r", hold=hold, started=started), max_in_flight=2, max_queued=4)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = ranker_pb2_grpc.RankerStub(ch)
                calls = [asyncio.ensure_future(stub.Predict(ranker_pb2.PredictRequest(request_id=str(i)), timeout=30))
                         for i in range(3)]  # 2 working, 1 waiting
                while len(started) < 2:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                ingress.load()  # a new window, all three in the door
                await asyncio.sleep(0.5)
                busy = ingress.load()
                hold.set()
                await asyncio.gather(*calls)
                await asyncio.sleep(0.3)
                ingress.load()
                await asyncio.sleep(0.2)
                idle = ingress.load()
        finally:
            await ingress.stop(None)
        return busy, idle

    busy, idle = asyncio.run(run())
    assert busy == pytest.approx(3.0, abs=0.05)
    assert idle == 0.0


def test_a_call_that_would_wait_past_its_deadline_is_refused_at_once_and_one_with_time_waits_its_turn():
    async def run():
        address = f"127.0.0.1:{free_port()}"

        async def predict(request, context):
            await asyncio.sleep(0.2)  # every call takes 200 ms in its slot
            return ranker_pb2.PredictResponse(request_id=request.request_id)

        ingress = start_ingress(address, predict=predict, **{k: v for k, v in _handlers("r").items() if k != "predict"},
                                max_in_flight=1, max_queued=8)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = ranker_pb2_grpc.RankerStub(ch)
                for i in range(4):  # the door learns a slot's time
                    await stub.Predict(ranker_pb2.PredictRequest(request_id=f"learn{i}"), timeout=5)
                busy = asyncio.ensure_future(stub.Predict(ranker_pb2.PredictRequest(request_id="busy"), timeout=5))
                await asyncio.sleep(0.05)  # it holds the one slot
                asked = time.monotonic()
                try:  # 200 ms ahead + 200 ms its own > 300 ms
                    await stub.Predict(ranker_pb2.PredictRequest(request_id="late"), timeout=0.3)
                    late = ("OK", "")
                except grpc.aio.AioRpcError as e:
                    late = (e.code().name, e.details())
                told_s = time.monotonic() - asked
                patient = await stub.Predict(ranker_pb2.PredictRequest(request_id="patient"), timeout=2)
                await busy
        finally:
            await ingress.stop(None)
        return late, told_s, patient.request_id

    (code, details), told_s, patient = asyncio.run(run())
    assert code == "RESOURCE_EXHAUSTED" and "left before the deadline" in details
    assert told_s < 0.1  # told at once, not after waiting
    assert patient == "patient"


def test_own_addresses_are_named_from_grpc_listen_and_refused_without_it_or_fewer_than_the_routers():
    from pydantic import ValidationError

    from serving.config import AppArgs

    args = AppArgs(package="p", grpc_listen="127.0.0.1:5000", grpc_own_addresses=4, router_replicas=2,
                   router_max_replicas=4)
    assert args.router_listen() == [f"127.0.1.{i}:5000" for i in range(1, 5)]
    assert AppArgs(package="p", grpc_listen="127.0.0.1:5000").router_listen() == "127.0.0.1:5000"
    with pytest.raises(ValidationError, match="grpc_own_addresses: needs grpc_listen"):
        AppArgs(package="p", grpc_own_addresses=2)
    with pytest.raises(ValidationError, match="grpc_own_addresses: 2 is fewer than the Router's 3 replicas"):
        AppArgs(package="p", grpc_listen="127.0.0.1:5000", grpc_own_addresses=2, router_replicas=3)


def test_each_requests_protobuf_parse_is_timed_as_a_stage_of_its_own():
    """gRPC parses a request before the handler runs: the ingress times that parse as "parse",
    one observation per Predict call (none for ModelInfo), and the handler gets the request whole."""
    async def run() -> tuple[list, list]:
        observed, seen = [], []
        handlers = _handlers("router", started=seen)
        address = f"127.0.0.1:{free_port()}"
        server = start_ingress(address, **handlers, max_in_flight=4, max_queued=4,
                               observe=lambda stage, ms: observed.append((stage, ms)))
        try:
            async with _channel(address) as ch:
                stub = ranker_pb2_grpc.RankerStub(ch)
                dense = [0.5] * 200_000  # 800 KB of floats: a parse that takes measurable time
                for i in range(3):
                    await stub.Predict(ranker_pb2.PredictRequest(request_id=f"r{i}", batch_size=1, dense=dense), timeout=10)
                await stub.ModelInfo(ranker_pb2.ModelInfoRequest(), timeout=10)
        finally:
            await server.stop(None)
        return observed, seen

    observed, seen = asyncio.run(run())
    assert seen == ["r0", "r1", "r2"]
    assert [stage for stage, _ in observed] == ["parse"] * 3 and all(ms > 0 for _, ms in observed), observed


def _overload_door(adaptive, clients: int = 48, seconds: float = 6.0):
    """A router whose work gains nothing past 2 calls at once (2 cores' worth, each call 10 ms of
    one), offered `clients` callers in closed loops: (the door, admitted latencies, codes)."""
    async def run():
        address = f"127.0.0.1:{free_port()}"
        cores = asyncio.Semaphore(2)

        async def predict(request, context):
            async with cores:
                await asyncio.sleep(0.010)
            return ranker_pb2.PredictResponse(request_id=request.request_id)

        ingress = start_ingress(address, predict=predict, **{k: v for k, v in _handlers("r").items() if k != "predict"},
                                max_in_flight=32, max_queued=32, adaptive=adaptive)
        admitted, codes = [], []
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = ranker_pb2_grpc.RankerStub(ch)
                end = time.monotonic() + seconds

                async def caller():
                    while time.monotonic() < end:
                        sent = time.monotonic()
                        try:
                            await stub.Predict(ranker_pb2.PredictRequest(batch_size=64), timeout=1)
                            admitted.append(time.monotonic() - sent)
                            codes.append("OK")
                        except grpc.aio.AioRpcError as e:
                            codes.append(e.code().name)
                            await asyncio.sleep(0.05)  # a refused caller backs off

                await asyncio.gather(*(caller() for _ in range(clients)))
        finally:
            await ingress.stop(None)
        return ingress._door, admitted, codes

    return asyncio.run(run())


def test_an_adaptive_door_comes_down_to_the_depth_its_throughput_needs_and_refuses_the_rest_at_once():
    """48 callers at a router that answers 200 calls/s at any depth from 2: a fixed door of 32
    (+ 32 waiting) admits them all; the adaptive door, full from the start, comes down toward 2
    within seconds, keeps answering, and refuses the others with RESOURCE_EXHAUSTED naming why.
    (What that does to the admitted latency is measured by benchmarks/overload.py, not here.)"""
    from serving.engine.concurrency import KneeConfig

    # steps of 0.6 s (3 windows of 0.2 s) instead of 1.5 s: from 32 to the knee within the test's 6 s;
    # a tolerance of 50%, so that a loaded machine's noise (CI at a load of 23 once stopped the
    # descent at 24 with 10%) cannot end it early: how the limit handles noise is
    # tests/serving/test_concurrency.py's; this test is the door following its limit over real gRPC
    door, admitted, codes = _overload_door(adaptive=KneeConfig(max_limit=32, window_s=0.2, per_step=3, tolerance=0.5))
    assert door.adaptive.stats.lowered >= 3 and door.slots() <= 16, (door.slots(), door.adaptive.stats)
    assert "RESOURCE_EXHAUSTED" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert len(admitted) >= 100  # it kept answering while it came down
    fixed, _, fixed_codes = _overload_door(adaptive=False, seconds=1.5)
    assert fixed.adaptive is None and fixed.slots() == 32 and set(fixed_codes) == {"OK"}
