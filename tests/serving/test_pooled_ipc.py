"""Pooled embeddings on the GPU between the shards and the tower (serving/engine/ipc.py): the
ring's rules for reusing a slot, the settings that choose the path, and a shard's copies into
targets, here on the CPU (tests/serving/test_gpu_pooled_ipc.py runs CUDA IPC itself on a GPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kernels import IndexOutOfRangeError
from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.api.errors import DeadlineExceeded
from serving.config import AppArgs
from serving.engine.ipc import IDLE_CLOSE_S, NO_DEADLINE_QUARANTINE_S, QUARANTINE_S, Lease, PooledRing, RingViews, SlotRing
from serving.engine.routing import Routing, ShardRequest
from serving.engine.shard import ShardCore


@pytest.fixture(scope="module")
def package(tiny, tmp_path_factory):
    from recserve.planning import plan_workload
    from recserve.random_init import export_random_package

    plan = plan_workload(tiny, strategy="load", num_shards=2)
    return ModelPackage.open(export_random_package(tiny, tmp_path_factory.mktemp("ipc") / "load-2", plan=plan,
                                                   seed=5, progress=False).path)


def test_a_released_slot_is_reused_and_a_full_ring_leaves_the_batch_to_the_host():
    ring = SlotRing(2)
    a, b = ring.lease(), ring.lease()
    assert {a, b} == {0, 1} and ring.lease() is None and ring.fell_back == 1
    ring.settle(a, clean=True, deadline=None)
    assert ring.lease() == a and ring.leased == 3


def test_a_slot_whose_call_was_abandoned_comes_back_only_after_its_deadline_and_the_grace():
    now = [100.0]
    ring = SlotRing(1, clock=lambda: now[0])
    slot = ring.lease()
    ring.settle(slot, clean=False, deadline=105.0)  # a call failed, was cancelled, hedged or resent
    now[0] = 105.0 + QUARANTINE_S - 0.01
    assert ring.lease() is None
    now[0] = 105.0 + QUARANTINE_S
    assert ring.lease() == slot
    ring.settle(slot, clean=False, deadline=now[0] - 50)  # a deadline long past: the grace counts from now
    now[0] += QUARANTINE_S - 0.01
    assert ring.lease() is None
    now[0] += 0.01
    assert ring.lease() == slot
    ring.settle(slot, clean=False, deadline=None)
    now[0] += NO_DEADLINE_QUARANTINE_S - 0.01
    assert ring.lease() is None
    now[0] += 0.01
    assert ring.lease() == slot and ring.quarantines == 3


def test_a_lease_marked_abandoned_by_a_resend_is_not_clean():
    lease = Lease(slot=0, offsets={0: 0})
    assert not lease.abandoned
    lease.abandon()  # DirectPlane.call's on_resend
    assert lease.abandoned


def test_ipc_is_chosen_on_cuda_with_the_direct_transport_and_the_tower_fanout_only():
    args = AppArgs()
    assert args.resolved_pooled_transport("cuda:0") == "ipc"
    assert args.resolved_pooled_transport("cpu") == "host"
    assert AppArgs(transport="reference").resolved_pooled_transport("cuda:0") == "host"
    assert AppArgs(fanout="router").resolved_pooled_transport("cuda:0") == "host"
    assert AppArgs(pooled_transport="host").resolved_pooled_transport("cuda:0") == "host"
    AppArgs(pooled_transport="ipc", device="auto")
    for bad in ({"device": "cpu"}, {"device": "cuda", "transport": "reference"},
                {"device": "cuda", "fanout": "router"}):
        with pytest.raises(ValueError, match="pooled_transport 'ipc'"):
            AppArgs(pooled_transport="ipc", **bad)


def test_a_ring_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        PooledRing(torch.device("cpu"), torch.float16, slots=2, slot_elems=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_outputs_copied_into_targets_equal_the_lookups_returned(tiny, package, dtype):
    routing = Routing(package.manifest)
    gen = TrafficGenerator(tiny, seed=11, empty_bag_fraction=0.3)
    for k in routing.columns:
        core = ShardCore(package, k, output_dtype=dtype)
        requests = [routing.split(gen.batch(B))[k] for B in (3, 1, 6)]
        want = [core.lookup(r) for r in requests]
        for chosen in ((0, 2), (0, 1, 2), (1,)):  # some outputs to targets, the rest returned
            targets = [torch.full((r.batch_size, core.output_dim), float("nan"), dtype=dtype) if i in chosen else None
                       for i, r in enumerate(requests)]
            outs = core.lookup_many(requests, targets)
            for i, (out, t) in enumerate(zip(outs, targets)):
                if i in chosen:
                    assert out is None
                    np.testing.assert_array_equal(t.numpy(), want[i])
                else:
                    np.testing.assert_array_equal(out, want[i])


def test_no_copy_into_a_target_once_its_deadline_passed_and_its_batch_mates_keep_theirs(tiny, package):
    """The fence behind the ring's short quarantine: a shard never queues a write into a slot
    whose caller has given up (its deadline passed before the copy), so the tower may reuse
    the slot soon after the deadline; the late request alone gets DEADLINE_EXCEEDED."""
    core = ShardCore(package, 0)
    gen = TrafficGenerator(tiny, seed=4)
    routing = Routing(package.manifest)
    late, fresh, none = (dataclasses.replace(routing.split(gen.batch(B))[0], deadline=d)
                         for B, d in ((3, 100.0), (2, 100.5), (4, None)))
    want = [core.lookup(r) for r in (late, fresh, none)]
    targets = [torch.full((r.batch_size, core.output_dim), float("nan")) for r in (late, fresh, none)]
    outs = core.lookup_many([late, fresh, none, fresh], [*targets, None], clock=lambda: 100.25)
    assert isinstance(outs[0], DeadlineExceeded) and "deadline passed" in str(outs[0])
    assert torch.isnan(targets[0]).all()  # never written
    assert outs[1:3] == [None, None]
    np.testing.assert_array_equal(targets[1].numpy(), want[1])
    np.testing.assert_array_equal(targets[2].numpy(), want[2])  # no deadline: no fence
    np.testing.assert_array_equal(outs[3], want[1])  # by the host: a late caller costs nothing more there


def test_a_request_without_ids_writes_zeros_and_a_bad_id_still_raises(tiny, package):
    core = ShardCore(package, 0)
    good = Routing(package.manifest).split(TrafficGenerator(tiny, seed=2).batch(4))[0]
    empty = ShardRequest(lengths=np.zeros_like(good.lengths), values=good.values[:0])
    target = torch.full((4, core.output_dim), float("nan"))
    assert core.lookup_many([empty], [target]) == [None]
    assert torch.equal(target, torch.zeros_like(target))
    values = good.values.copy()
    values[0] = -1
    with pytest.raises(IndexOutOfRangeError):
        core.lookup_many([ShardRequest(lengths=good.lengths, values=values)], [target])


def _handle(ring_id: bytes, **desc) -> np.ndarray:
    """A ring's handle as a tower sends it (serving/engine/ipc.py), for a ring this process cannot open."""
    import pickle

    return np.frombuffer(ring_id.ljust(16, b"-") + pickle.dumps({"host": "elsewhere", "gpu": "", **desc}), np.uint8)


def test_a_shard_answers_by_the_host_for_a_ring_it_cannot_reach_and_closes_rings_left_idle():
    now = [0.0]
    views = RingViews(torch.device("cpu"), clock=lambda: now[0])
    assert views.target(_handle(b"tower-a"), 0, 2, 8, torch.float16) is None  # another host
    assert views.refused == {"another host": 1}
    assert views.target(_handle(b"tower-a"), 0, 2, 8, torch.float16) is None
    assert views.refused == {"another host": 1}  # looked at once per ring, not per call
    now[0] = IDLE_CLOSE_S / 2
    views.target(_handle(b"tower-b"), 0, 2, 8, torch.float16)
    now[0] = IDLE_CLOSE_S + 1  # a was last used at 0, b at IDLE_CLOSE_S / 2
    views.target(_handle(b"tower-c"), 0, 2, 8, torch.float16)
    assert [k.rstrip(b"-") for k in views._open] == [b"tower-b", b"tower-c"]
    for i in range(20):  # never more than 16 kept
        views.target(_handle(f"t{i}".encode()), 0, 2, 8, torch.float16)
    assert len(views._open) == 16 and views.open_rings == 0


def test_a_batch_larger_than_a_slot_is_told_apart_from_a_full_ring_and_a_quarantine_is_reported():
    """PooledRing.fits (the tower counts 'too_large' apart from 'host', no slot free): checked
    on SlotRing's arithmetic without a GPU, as the ring's own lease uses it."""
    from serving.engine.ipc import PooledRing

    ring = PooledRing.__new__(PooledRing)  # the arithmetic only: no device buffer
    ring.slot_elems = 64 * 10
    assert ring.fits(64, {0: 4, 1: 6}) and not ring.fits(65, {0: 4, 1: 6}) and ring.fits(1, {0: 640})
    from serving.engine.ipc import Lease, SlotRing

    ring.ring = SlotRing(2)
    clean, resent = Lease(ring.ring.lease(), {0: 0}), Lease(ring.ring.lease(), {0: 640})
    resent.abandon()
    assert ring.settle(clean, failed=False, deadline=None) is False  # back in the ring
    assert ring.settle(resent, failed=False, deadline=None) is True  # quarantined: the tower counts it
    assert ring.ring.quarantines == 1 and ring.ring.lease() == clean.slot and ring.ring.lease() is None


def test_a_shard_answers_a_call_into_a_ring_only_once_nothing_of_its_can_write_the_slot(package, tiny):
    """The tower frees a slot at the shards' answers (serving/engine/ipc.py), also at an error
    answer. So a shard whose caller's deadline passes while the lookup holding its call runs
    answers DEADLINE_EXCEEDED only when that lookup is done (it may be copying into the slot),
    and a lookup that starts after the answer leaves the slot alone. Here the lookup is held on
    a CPU target by an event: the GPU's copy still queued behind its stream."""
    import asyncio
    import threading
    import time

    from serving.app.deployments import Shard

    shard = Shard.func_or_class(str(package.path), 0, AppArgs(package=str(package.path), transport="reference"))
    running, release = threading.Event(), threading.Event()
    real, given = shard.core.lookup_many, []

    def held(requests, targets=None, **kw):
        given.append(list(targets or []))
        running.set()
        release.wait(30)
        return real(requests, targets, **kw)

    shard.core.lookup_many = held
    routing = Routing(package.manifest)
    batch = TrafficGenerator(tiny, seed=3).batch(4)

    def request(deadline_s: float) -> ShardRequest:
        return dataclasses.replace(routing.split(batch)[0], deadline=time.time() + deadline_s)

    width = shard.core.output_dim
    first, second = (torch.zeros(4, width, dtype=shard.core.output_dtype) for _ in range(2))

    async def main():
        a = asyncio.ensure_future(shard.lookup(request(0.3), first))
        while not running.is_set():
            await asyncio.sleep(0.01)
        b = asyncio.ensure_future(shard.lookup(request(0.3), second))  # waits behind a's lookup
        await asyncio.sleep(0.8)  # both deadlines passed, a's lookup still running
        early = a.done() or b.done()
        release.set()
        answers = await asyncio.gather(a, b, return_exceptions=True)
        await shard._batcher.settled()
        return early, answers

    early, answers = asyncio.run(asyncio.wait_for(main(), 60))
    assert not early, "a shard answered while its lookup could still write the slot"
    assert all(isinstance(x, DeadlineExceeded) for x in answers), answers
    assert all(targets == [None] for targets in given[1:]), "a lookup after the answer was given the slot"
    assert not second.any(), "the slot of a call already answered was written"


def _cpu_ring(slots: int, slot_elems: int, dtype: torch.dtype) -> PooledRing:
    """A PooledRing's bookkeeping over a CPU buffer (CUDA IPC itself: tests/serving/test_gpu_pooled_ipc.py)."""
    ring = PooledRing.__new__(PooledRing)
    ring.device, ring.dtype, ring.slot_elems = torch.device("cpu"), dtype, slot_elems
    ring.buffer = torch.zeros(slots * slot_elems, dtype=dtype)
    ring.ring = SlotRing(slots)
    ring.handle = np.frombuffer(b"cpu-ring".ljust(16, b"-"), np.uint8)
    return ring


def test_a_towers_slot_comes_back_at_the_shards_answers_also_when_its_call_was_cancelled(serve_instance, package,
                                                                                       tiny):
    """The tower's call into its ring is cancelled at its deadline while the shards still look up
    (an overload): the slot stays out until both shards have answered, then comes back to the
    ring, not into quarantine (quarantined at every cancel, the slots ran out under overload and the
    batches fell back to the host path). A shard whose connection breaks leaves it quarantined.
    Real channels and the tower's own code; the shards are handlers that answer late."""
    import asyncio
    import time

    from ray.experimental import internal_kv

    from serving.app.dataplane import DirectPlane, _forget, _key
    from serving.app.deployments import DenseTower
    from serving.engine.channel import ChannelServer

    app = "ring-cancel"
    tower = DenseTower.func_or_class(str(package.path), [], AppArgs(package=str(package.path), transport="reference"))
    widths = tower._widths
    tower._ring = ring = _cpu_ring(1, 64 * sum(widths.values()), torch.float16)
    tower._plane, tower._app = DirectPlane(), app
    batch = TrafficGenerator(tiny, seed=4).batch(8)
    answered, breaking = [], asyncio.Event()

    def shard(k: int):
        async def lookup(arrays, deadline):
            assert len(arrays) == 5  # the ring's handle and this shard's offset came with the call
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # the deadline: a shard answers once its running lookup is done
                if breaking.is_set():
                    for server in servers:
                        server.close()  # the replica goes away without answering
                await asyncio.sleep(0.3)
                answered.append(k)
                raise
        return {"lookup": lookup}

    async def call(deadline_s: float):
        requests = {k: dataclasses.replace(r, deadline=time.time() + deadline_s)
                    for k, r in tower.routing.split(batch).items()}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(tower._predict_direct(batch.dense, requests), deadline_s)  # as the channel does

    async def main():
        nonlocal servers
        servers = [ChannelServer(shard(k), "127.0.0.1") for k in range(2)]
        endpoints = []
        for k, server in enumerate(servers):
            await server.start()
            endpoints.append((f"s{k}", "127.0.0.1", server.port, tower.version))
            internal_kv._internal_kv_put(_key(app, f"shard-{k}", endpoints[-1]), b"", overwrite=True,
                                         namespace="recserve")
        try:
            await call(0.2)
            out_while_looking = ring.ring.lease()  # the shards still write: no slot
            await asyncio.sleep(0.6)
            back = ring.ring.lease()
            ring.ring.settle(back, clean=True, deadline=None)
            breaking.set()
            await call(0.2)
            await asyncio.sleep(1.5)
            return out_while_looking, back, ring.ring.lease(), ring.ring.quarantines
        finally:
            tower._plane.close()
            for k, endpoint in enumerate(endpoints):
                _forget(app, f"shard-{k}", endpoint)
            for server in servers:
                server.close()

    servers = []
    out_while_looking, back, after_break, quarantines = asyncio.run(asyncio.wait_for(main(), 60))
    assert out_while_looking is None, "the slot was free while the shards could still write it"
    assert back == 0 and sorted(answered[:2]) == [0, 1], "the slot did not come back at the shards' answers"
    assert after_break is None and quarantines == 1, "a call left unanswered did not quarantine the slot"


def test_a_hedged_call_into_the_ring_frees_its_slot_once_both_replicas_have_answered(serve_instance, package, tiny):
    """A shard call that is slow to answer also goes to the shard's other replica (DirectPlane's
    hedge); the first replica may still write the slot. The slot stays out until the replica that
    lost the race has answered too, then comes back (it used to be quarantined for the deadline
    plus 2 s: under overload hedges emptied the ring as cancels did)."""
    import asyncio
    import time

    from ray.experimental import internal_kv

    from serving.app.dataplane import DirectPlane, _forget, _key
    from serving.app.deployments import DenseTower
    from serving.engine.channel import ChannelServer

    app = "ring-hedge"
    tower = DenseTower.func_or_class(str(package.path), [], AppArgs(package=str(package.path), transport="reference"))
    tower._ring = ring = _cpu_ring(1, 64 * sum(tower._widths.values()), torch.float16)
    tower._plane, tower._app = DirectPlane(hedge_floor_s=0.15), app  # hedged after 150 ms at the least
    batch = TrafficGenerator(tiny, seed=4).batch(8)
    slow = {"armed": False}
    answered = []

    def replica(name: str):
        async def lookup(arrays, deadline):
            if slow["armed"]:
                slow["armed"] = False  # the first call after arming is the slow one
                await asyncio.sleep(1.0)
                answered.append(name)
            return [None] if len(arrays) == 5 else [np.zeros((int(arrays[0].shape[0]), 1), np.float16)]
        return {"lookup": lookup}

    async def main():
        names = [("shard-0", "a"), ("shard-0", "b"), ("shard-1", "c")]
        servers = [ChannelServer(replica(n), "127.0.0.1") for _, n in names]
        keys = []
        for (deployment, n), server in zip(names, servers):
            await server.start()
            keys.append((deployment, (n, "127.0.0.1", server.port, tower.version)))
            internal_kv._internal_kv_put(_key(app, *keys[-1]), b"", overwrite=True, namespace="recserve")
        requests = {k: dataclasses.replace(r, deadline=time.time() + 30) for k, r in tower.routing.split(batch).items()}
        try:
            for _ in range(48):  # the plane learns how long shard-0 takes (its hedging needs a P90)
                await tower._plane.call(app, "shard-0", "lookup", [np.zeros(2, np.int32)], version=tower.version)
            hedges, slow["armed"] = tower._plane.hedges, True
            scores = await tower._predict_direct(batch.dense, requests)
            hedged, lost_answered = tower._plane.hedges - hedges, list(answered)
            out_while_racing = ring.ring.lease()
            await asyncio.sleep(1.2)
            back = ring.ring.lease()
            return scores, hedged, lost_answered, out_while_racing, back
        finally:
            tower._plane.close()
            for key in keys:
                _forget(app, *key)
            for server in servers:
                server.close()

    scores, hedged, lost_answered, out_while_racing, back = asyncio.run(asyncio.wait_for(main(), 60))
    assert hedged == 1 and answered in (["a"], ["b"]), f"the slow call was not hedged ({hedged}, {answered})"
    assert not lost_answered, "the batch's scores waited for the replica that lost the race"
    assert np.isfinite(scores).all() and scores.shape == (8,)
    assert out_while_racing is None, "the slot was free while the replica that lost the race could still write it"
    assert back == 0 and ring.ring.quarantines == 0, "the slot did not come back once both replicas had answered"
