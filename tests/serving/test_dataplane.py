"""The data plane's replica directory (serving/app/dataplane.py) in a real Ray's GCS with real
sockets: a caller reaches only replicas of its own model version (while Serve updates an
application in place, old and new replicas share its deployment names), and a version with no
replica left is NoReplica, never another version's answer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.app.dataplane import DirectPlane, NoReplica, _forget, _key, list_endpoints
from serving.engine.channel import ChannelServer

APP = "dataplane-versions"


def _answering(tag: int):
    async def lookup(arrays, deadline):
        return [np.full(2, tag, np.int32)]
    return {"lookup": lookup}


def test_a_caller_reaches_only_replicas_of_its_own_version(serve_instance) -> None:
    from ray.experimental import internal_kv

    async def main():
        servers = [(v, ChannelServer(_answering(tag), "127.0.0.1")) for tag, v in enumerate(["v1", "v2/b@c", "v1"])]
        endpoints = []
        for i, (version, server) in enumerate(servers):
            await server.start()
            endpoint = (f"r{i}", "127.0.0.1", server.port, version)
            internal_kv._internal_kv_put(_key(APP, "shard-0", endpoint), b"", overwrite=True, namespace="recserve")
            endpoints.append(endpoint)
        plane = DirectPlane()
        try:
            listed = sorted(list_endpoints(APP)["shard-0"])
            got = {v: {int((await plane.call(APP, "shard-0", "lookup", [np.zeros(1)], version=v))[0][0])
                       for _ in range(40)} for v in ("v1", "v2/b@c")}
            with pytest.raises(NoReplica, match="no replica of version 'v3'"):
                await plane.call(APP, "shard-0", "lookup", [np.zeros(1)], version="v3")
            return listed, got
        finally:
            plane.close()
            for endpoint in endpoints:
                _forget(APP, "shard-0", endpoint)
            for _, server in servers:
                server.close()

    listed, got = asyncio.run(asyncio.wait_for(main(), 60))
    assert [e[3] for e in listed] == ["v1", "v2/b@c", "v1"], "the version survives the key, quoted"
    assert got == {"v1": {0, 2}, "v2/b@c": {1}}, "v1's two replicas both served v1; v2 only v2"


def test_a_shard_or_tower_of_another_version_refuses_the_call_through_serve_too(serve_instance, two_versions, tiny):
    """Serve's handles (the fallback path) route to any replica of a deployment, old or new while
    an application is updated in place: v2's shard and tower refuse what v1 split, by name."""
    from recserve.package import ModelPackage
    from serving.api.errors import ShardUnavailable
    from serving.app.deployments import DenseTower, Shard
    from serving.config import AppArgs
    from serving.engine.routing import Routing
    from recserve.synth import TrafficGenerator

    (v1, _), (v2, _) = two_versions["v1"], two_versions["v2"]
    args = AppArgs(package=str(v2), transport="reference")
    shard = Shard.func_or_class(str(v2), 0, args)
    tower = DenseTower.func_or_class(str(v2), [], args)
    batch = TrafficGenerator(tiny, seed=5).batch(4)
    split = {v: Routing(ModelPackage.open(p).manifest).split(batch) for v, p in (("v1", v1), ("v2", v2))}

    async def main():
        ok = await shard.lookup(split["v2"][0])
        with pytest.raises(ShardUnavailable, match="serves model version 'v2', the request was split by version 'v1'"):
            await shard.lookup(split["v1"][0])
        with pytest.raises(ShardUnavailable, match="DenseTower"):
            await tower.predict(batch.dense, split["v1"])
        with pytest.raises(ShardUnavailable, match="DenseTower"):
            await tower.score(batch.dense, ok, None, version="v1")
        return ok, await tower.score(batch.dense, ok, None, version="v2")

    pooled, scores = asyncio.run(asyncio.wait_for(main(), 60))
    assert pooled.shape[0] == 4 and np.isfinite(scores).all()


def test_a_replica_that_stops_answering_costs_a_hedge_not_a_deadline(serve_instance) -> None:
    """A replica whose process stops (SIGSTOP, a host gone from the network) keeps its connection
    open and answers nothing. Once the plane knows how long calls take, a call it is slow to
    answer goes to the other replica too; the silent one is passed over for a while."""
    from ray.experimental import internal_kv

    app = APP + "-silent"
    silent = asyncio.Event()

    def answering(tag: int):
        async def lookup(arrays, deadline):
            if tag == 0 and silent.is_set():
                await asyncio.sleep(3600)
            return [np.full(2, tag, np.int32)]
        return {"lookup": lookup}

    async def main():
        servers = [ChannelServer(answering(tag), "127.0.0.1") for tag in range(2)]
        endpoints = []
        for i, server in enumerate(servers):
            await server.start()
            endpoints.append((f"r{i}", "127.0.0.1", server.port, "v1"))
            internal_kv._internal_kv_put(_key(app, "shard-0", endpoints[-1]), b"", overwrite=True,
                                         namespace="recserve")
        plane = DirectPlane(hedge_floor_s=0.05, slow_out_s=30)
        call = lambda: plane.call(app, "shard-0", "lookup", [np.zeros(1)], version="v1", deadline=None)
        try:
            warm = [int((await call())[0][0]) for _ in range(80)]  # both answer: the plane learns their times
            hedged_warm = plane.hedges  # a pause on a busy machine may hedge already
            silent.set()
            t = time.monotonic()
            after = [int((await asyncio.wait_for(call(), 5))[0][0]) for _ in range(30)]
            return warm, after, time.monotonic() - t, plane.hedges - hedged_warm, plane.hedges_won
        finally:
            plane.close()
            for endpoint in endpoints:
                _forget(app, "shard-0", endpoint)
            for server in servers:
                server.close()

    warm, after, took, hedges, won = asyncio.run(asyncio.wait_for(main(), 120))
    assert set(warm) == {0, 1}, "both replicas served before"
    assert after == [1] * 30, "every call was answered, by the replica that still answers"
    assert won >= 1, "a call the silent replica held went to the other, and that one answered"
    assert hedges <= 2, f"the silent replica was passed over after its first miss ({hedges} hedges)"
    assert took < 5, f"30 calls took {took:.1f} s: some waited on the silent replica"
