"""CUDA IPC of pooled embeddings (serving/engine/ipc.py) on a GPU: a shard in another process
writes its lookups into the tower's ring and they equal its host output bit for bit; a ring on
another GPU or host is never opened; the served stack scores alike by both paths and the
tower counts its batches by the ring (`recserve serve` as a subprocess). Skipped without a GPU (run on the device: the log in
benchmarks/results/pooled-ipc-h100/)."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recserve.package import ModelPackage
from recserve.synth import TrafficGenerator
from serving.engine.ipc import PooledRing, RingViews
from serving.engine.routing import Routing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[2]

# the shard's side, in a process of its own: opens the ring, writes its lookups there, prints the host path's
_SHARD = """
import pickle, sys
import numpy as np, torch
from recserve.package import ModelPackage
from serving.engine.ipc import RingViews
from serving.engine.shard import ShardCore
job = pickle.loads(sys.stdin.buffer.read())
core = ShardCore(ModelPackage.open(job["package"]), job["shard"], device="cuda", output_dtype=torch.float16,
                 max_batch_size=64)
views = RingViews(core.device)
targets = [views.target(job["handle"], off, r.batch_size, core.output_dim, torch.float16)
           for r, off in zip(job["requests"], job["offsets"])]
assert all(t is not None for t in targets), dict(views.refused)
assert views.target(job["handle"], 0, 1, core.output_dim, torch.float32) is None  # another dtype: the host path
assert views.target(job["handle"], job["elems"] - core.output_dim + 1, 1, core.output_dim, torch.float16) is None
assert core.lookup_many(job["requests"], targets) == [None] * len(targets)
np.save(job["out"], np.concatenate([core.lookup(r) for r in job["requests"]]))
"""


@pytest.fixture(scope="module")
def package(tiny, tmp_path_factory) -> Path:
    from recserve.planning import plan_workload
    from recserve.random_init import export_random_package

    plan = plan_workload(tiny, strategy="load", num_shards=2)
    return export_random_package(tiny, tmp_path_factory.mktemp("ipc-gpu") / "load-2", plan=plan, seed=5,
                                 progress=False).path


def test_a_shard_in_another_process_writes_its_lookups_into_the_towers_ring(tiny, package, tmp_path):
    routing = Routing(ModelPackage.open(package).manifest)
    width = len(routing.columns[0]) * routing.dim
    ring = PooledRing(torch.device("cuda", 0), torch.float16, slots=2, slot_elems=200 * width)
    gen = TrafficGenerator(tiny, seed=3, empty_bag_fraction=0.2)
    requests = [routing.split(gen.batch(B))[0] for B in (1, 37, 100, 5)]  # 100: above the shard's buckets (eager)
    leases = [ring.lease(r.batch_size, {0: width}) for r in requests[:2]]
    ring.settle(leases[0], failed=False, deadline=None)
    leases[0] = ring.lease(requests[0].batch_size, {0: width})  # the released slot again
    leases += [leases[0], leases[1]]  # two requests' parts in one slot: offsets apart
    offsets = [leases[0].offsets[0], leases[1].offsets[0],
               leases[0].offsets[0] + requests[0].batch_size * width, leases[1].offsets[0] + 37 * width]
    job = {"package": str(package), "shard": 0, "handle": ring.handle, "offsets": offsets, "requests": requests,
           "elems": ring.buffer.numel(), "out": str(tmp_path / "host.npy")}
    run = subprocess.run([sys.executable, "-c", _SHARD], input=pickle.dumps(job), capture_output=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    want = np.load(tmp_path / "host.npy")  # [sum B, C * D] float16, by the host path
    got = np.concatenate([ring.buffer[off:off + r.batch_size * width].view(r.batch_size, width).cpu().numpy()
                          for r, off in zip(requests, offsets)])
    np.testing.assert_array_equal(got, want)


def test_a_ring_on_another_gpu_or_host_is_not_opened():
    ring = PooledRing(torch.device("cuda", 0), torch.float16, slots=1, slot_elems=64)
    views = RingViews(torch.device("cuda", 0))
    desc = pickle.loads(ring.handle[16:].tobytes())
    for field, why in (("gpu", "another GPU"), ("host", "another host")):
        forged = np.frombuffer(field.encode().ljust(16, b"-") + pickle.dumps(dict(desc, **{field: "x"})), np.uint8)
        assert views.target(forged, 0, 2, 8, torch.float16) is None
        assert views.refused[why] == 1


def _pooled_batches(metrics_url: str, at_least: int, timeout_s: float = 30.0) -> dict[str, float]:
    """The towers' recserve_pooled_batches counter by path, once it counts ``at_least`` batches."""
    import urllib.request

    counts: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(metrics_url, timeout=5) as r:
            page = r.read().decode("utf-8", "replace")
        counts = {}
        for m in re.finditer(r'^\w*recserve_pooled_batches\w*\{[^}]*path="(\w+)"[^}]*\} (\S+)$', page, re.M):
            counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
        if sum(counts.values()) >= at_least:
            break
        time.sleep(1)
    return counts


def test_the_served_stack_scores_alike_by_the_ring_and_by_the_host(tiny, package, tmp_path, helpers):
    """`recserve serve --device cuda`, as a user starts it: by default (auto) its pooled
    embeddings go by the ring; with --pooled-transport host by the host; the same scores."""
    from loadtest.targets import ServeStack
    from serving.api.client import RankingClient
    from serving.engine.local_ranker import LocalRanker

    reference = LocalRanker.load(ModelPackage.open(package))
    gen = TrafficGenerator(tiny, seed=9, empty_bag_fraction=0.1)
    batches = [gen.batch(B) for B in (1, 17, 64)]  # 64: the largest request, a whole slot
    small = ("--max-batch-size", "64", "--coalesce-max-examples", "64")  # few buckets to capture at start
    scores, counts = {}, {}
    for mode, flags in (("auto", ()), ("host", ("--pooled-transport", "host"))):
        with ServeStack(package, name=mode, log_dir=tmp_path, device="cuda", extra_args=(*small, *flags)) as stack, \
                RankingClient(stack.address) as client:
            scores[mode] = [client.predict(b.dense, helpers.as_sparse(b), timeout=60) for b in batches]
            counts[mode] = _pooled_batches(stack.metrics_url, at_least=len(batches) if mode == "auto" else 0)
    for b, by_ring, by_host in zip(batches, scores["auto"], scores["host"]):
        np.testing.assert_allclose(by_ring, by_host, rtol=0, atol=1e-6)
        np.testing.assert_allclose(by_ring, reference.score(b), rtol=0, atol=2e-3)  # float16 on the wire
    assert counts["auto"].get("ipc", 0) >= len(batches) and not counts["auto"].get("declined"), counts
    assert not counts["host"].get("ipc"), counts
