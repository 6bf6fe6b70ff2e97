"""Shards and towers autoscale by how busy they are, the Router by requests in flight
(serving/app/autoscaling.py): the policies' arithmetic on Serve's own context, the replicas' busy
fraction, and a shard and a Router serving gRPC itself (--ingress shared, which Serve never
sees a request of) that Serve's real controller scales up under load and back down when it stops."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from recserve.synth import TrafficGenerator
from serving.app.autoscaling import BUSY_METRIC, IN_FLIGHT_METRIC, BusyPolicy, InFlightPolicy


def _context(busy: dict, requests: float, target_ongoing: float = 2.0, replicas: int = 2, metric: str = BUSY_METRIC):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name="shard-0", app_name="app")
    running = [ReplicaID(f"r{i}", deployment_id=dep) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=running, total_num_requests=requests,
        total_queued_requests=0.0, aggregated_metrics={metric: {running[i]: b for i, b in busy.items()}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
        config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target_ongoing))


@pytest.mark.parametrize("busy, requests, wanted", [
    ({0: 0.9, 1: 0.6}, 1.0, 2.5),   # 1.5 busy replicas at a 0.6 target: two and a half
    ({0: 0.1, 1: 0.2}, 0.0, 0.5),   # mostly idle: fewer
    ({0: 1.0}, 0.0, 1 / 0.6),       # one replica has not reported yet: counted idle
    ({0: 0.1, 1: 0.1}, 8.0, 4.0),   # uncoalesced calls queue up: Serve's own count is higher
])
def test_the_policy_wants_the_summed_busy_fraction_over_the_target(busy, requests, wanted) -> None:
    assert BusyPolicy(target_busy=0.6)(_context(busy, requests)) == (pytest.approx(wanted), {})


@pytest.mark.parametrize("in_flight, requests, wanted", [
    ({0: 6.0, 1: 2.0}, 0.0, 2.0),   # the routers' own count (Serve saw none): 8 in flight at 4 each
    ({0: 1.0}, 0.0, 0.25),          # one reported, one not yet: counted as none
    ({}, 12.0, 3.0),                # Serve's ingress: its own count
    ({0: 1.0, 1: 1.0}, 12.0, 3.0),  # whichever is higher
])
def test_the_router_policy_wants_its_requests_in_flight_over_the_target(in_flight, requests, wanted) -> None:
    ctx = _context(in_flight, requests, target_ongoing=4.0, metric=IN_FLIGHT_METRIC)
    assert InFlightPolicy()(ctx) == (pytest.approx(wanted), {})


def test_router_max_replicas_becomes_serves_autoscaling_config_or_is_refused_by_name() -> None:
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig

    from serving.config import AppArgs

    assert AppArgs(package="p").router_autoscaling() is None  # fixed at router_replicas
    config = AutoscalingConfig(**AppArgs(package="p", router_replicas=2, router_max_replicas=6,
                                         max_in_flight=32).router_autoscaling())
    # half of one router's share of the stack's door (32 over up to 6 routers: 6 each)
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (2, 6, 3)
    assert config.policy.policy_function == "serving.app.autoscaling:InFlightPolicy"
    with pytest.raises(ValidationError, match="router_max_replicas"):
        AppArgs(package="p", router_replicas=3, router_max_replicas=2)


@pytest.mark.parametrize("target", [0, -0.5, 1.5])
def test_a_target_outside_zero_to_one_is_refused_by_name(target) -> None:
    with pytest.raises(ValueError, match="target_busy"):
        BusyPolicy(target_busy=target)


def test_the_busy_fraction_is_the_share_of_time_the_core_ran() -> None:
    from serving.app.deployments import _Batcher, _TowerItem

    async def main() -> tuple[float, float]:
        batcher = _Batcher(lambda items: (time.sleep(0.02), items)[1], name="t", work="w")
        batcher.utilization()
        for i in range(15):  # back to back: busy nearly all the time
            await batcher(_TowerItem(np.zeros((1, 1), np.float32), ()))
        busy = batcher.utilization()
        await asyncio.sleep(0.1)  # nothing ran since
        return busy, batcher.utilization()

    busy, idle = asyncio.run(main())
    assert 0.5 < busy <= 1.0
    assert idle == 0.0


def test_serve_scales_a_busy_shard_up_and_an_idle_one_back_down(serve_instance, tiny_packages, tiny) -> None:
    """The real controller with the policy as deploy/serve.yaml names it: load adds a replica,
    quiet takes it away again."""
    from ray import serve

    from recserve.package import ModelPackage
    from serving.app.deployments import Shard
    from serving.config import AppArgs
    from serving.engine.routing import Routing

    package = str(tiny_packages("table-2"))
    app = Shard.options(name="shard-0", num_replicas="auto", autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 2,
        "look_back_period_s": 2, "metrics_interval_s": 0.5,
        "policy": {"policy_function": "serving.app.autoscaling:BusyPolicy", "policy_kwargs": {"target_busy": 0.2}},
    }).bind(package, 0, AppArgs(package=package, transport="reference"))
    lookup = serve.run(app, name="autoscaled", route_prefix="/autoscaled").options(method_name="lookup")
    request = Routing(ModelPackage.open(package).manifest).split(TrafficGenerator(tiny, seed=3).batch(4096))[0]

    def replicas() -> int:
        return _kept_replicas("autoscaled", "shard-0")

    def load(stop: threading.Event) -> None:
        while not stop.is_set():
            lookup.remote(request).result(timeout_s=60)

    try:
        # 1 at first, 2 under load (a busy shard), 1 again once idle
        assert _replicas_before_during_and_after_load(replicas, load, callers=4) == (1, 2, 1)
    finally:
        lookup.shutdown()  # its router pushes this process's autoscaling metrics until shut down
        serve.delete("autoscaled", _blocking=False)


def test_serve_scales_a_router_that_serves_grpc_itself_by_its_requests_in_flight(serve_instance, tiny_packages,
                                                                                  tiny) -> None:
    """--ingress shared: Serve never sees these requests, its own count stays 0; the routers'
    reported requests in flight (InFlightPolicy) add a replica under load and take it away after."""
    import grpc
    from ray import serve

    from recserve.v1 import ranker_pb2_grpc
    from serving.app.builder import _resolved, _version_deployments
    from serving.app.deployments import Router
    from serving.config import AppArgs
    from serving.ops.ports import free_port
    from loadtest.trace import encode_request

    address = f"127.0.0.1:{free_port()}"
    args, manifest = _resolved(AppArgs(package=str(tiny_packages("table-2")), grpc_listen=address))
    shards, tower = _version_deployments(args, manifest)
    app = Router.options(name="Router", num_replicas="auto", max_ongoing_requests=32, autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
        "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5,
        "policy": {"policy_function": "serving.app.autoscaling:InFlightPolicy"},
    }).bind(args.package, shards, tower, args)
    serve.run(app, name="router-scaled", route_prefix="/router-scaled")
    request = encode_request(TrafficGenerator(tiny, seed=3).batch(256), model=manifest.name)

    def replicas() -> int:
        return _kept_replicas("router-scaled", "Router")

    answered = []

    def load(stop: threading.Event) -> None:  # a connection of its own per caller: the kernel balances connections
        with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            predict = ranker_pb2_grpc.RankerStub(ch).Predict
            while not stop.is_set():
                answered.append(len(predict(request, timeout=30).scores))

    try:
        # 8 callers at a target of 2 in flight: a second Router replica, gone again once idle
        assert _replicas_before_during_and_after_load(replicas, load, callers=8) == (1, 2, 1)
        assert answered and set(answered) == {256}
    finally:
        serve.delete("router-scaled", _blocking=True)


def _kept_replicas(app: str, deployment: str) -> int:
    """The replicas Serve keeps (starting or running, not stopping): the controller's decision.
    How long a new replica takes to start is Ray's, and on a loaded 2-core machine it ran past
    90 s (a CI run: 48 s for the first Router replica alone)."""
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if state not in ("STOPPING", "STOPPED"))


def _replicas_until(replicas, wanted: int, timeout_s: float = 90.0) -> int:
    deadline = time.monotonic() + timeout_s
    while replicas() != wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    return replicas()


def _replicas_before_during_and_after_load(replicas, load, *, callers: int) -> tuple[int, int, int]:
    """Replicas kept before, under ``callers`` threads of ``load(stop)`` (once 2 are, or 90 s),
    and after they stop (once 1 is, or 90 s)."""
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(stop,), daemon=True) for _ in range(callers)]
    before = replicas()
    try:
        for t in threads:
            t.start()
        during = _replicas_until(replicas, 2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    return before, during, _replicas_until(replicas, 1)
