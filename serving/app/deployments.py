"""Ray Serve deployments: thin wrappers over the cores.

    Router      gRPC ingress (recserve.v1.Ranker + grpc.health.v1.Health); loads no tables
    shard-K     one deployment per shard (Shard class); replicas are copies of shard K
    DenseTower  bottom MLP -> interaction -> top MLP

Where the pooled embeddings go (``AppArgs.fanout``) -- never through the router:
    "router": the router calls the shards and hands their DeploymentResponses to the tower
              (needs the "reference" transport: shard -> object store -> tower);
    "tower":  the router sends the split ids to the tower, which calls the shards itself
              (Lui et al.'s main shard): shard -> tower directly, over either transport.
A request larger than a deployment's dynamic batch runs alone (never rejected), and the
inter-deployment gRPC message limit is lifted (``transport_env``), so every request the API
accepts passes every deployment.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.serve.metrics import Counter, Gauge, Histogram

from recserve.package import ModelPackage
from serving.engine.admission import Admission, AdmissionConfig
from serving.api.wire import ARRIVAL_DEADLINE_ATTR, HEALTH_SERVICES, caller_timeout_s
from serving.api.codec import ModelSpec, check_model, decode_request, encode_response, model_info
from serving.engine.coalesce import Coalescer, concat_batches, split_rows, too_late
from serving.engine.occupancy import TimeAverage
from serving.config import AppArgs, BatchingConfig
from serving.api.errors import DeadlineExceeded, Overloaded, ServingError, ShardUnavailable
from serving.example_log import config_of, example_log_for
from serving.engine import routing as routing_module  # a module global: Serve pickles Router by value
from serving.engine.routing import FeatureFilter, Routing, ShardRequest, load_feature_filter
from serving.engine.ipc import PooledRing, RingViews, all_answered, answered
from serving.engine.pooled import embedding_dtype
from serving.engine.shard import ShardCore
from serving.engine.stages import BOUNDARIES_MS, STAGE_DESCRIPTION, STAGE_METRIC, Observe, Stopwatch
from serving.api.status import grpc_status
from serving.engine.tower import TowerCore
from serving.app.autoscaling import BUSY_METRIC, IN_FLIGHT_METRIC
from serving.app.dataplane import DirectPlane, NoReplica, ReplicaEndpoint
from serving.app.grpc_ingress import start_ingress
from serving.app.version_store import load_table
from serving.app.versions import RouterVersions, ServedVersion, VersionTable

logger = logging.getLogger("ray.serve")


def ray_observer() -> Observe:
    """The stage histogram of a Serve replica (serving/engine/stages.py; Ray's metrics, Serve adds
    deployment and replica tags)."""
    h = Histogram(STAGE_METRIC, description=STAGE_DESCRIPTION, boundaries=BOUNDARIES_MS, tag_keys=("stage",))
    return lambda stage, ms: h.observe(ms, tags={"stage": stage})

_DOWN_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)


def shard_name(index: int) -> str:
    return f"shard-{index}"


INGRESS_GRACE_S = 10.0  # a stopping Router replica's calls in flight on the shared port get this long

_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


def _examples(items: list) -> int:
    """batch_size_fn of @serve.batch: count examples, not requests."""
    return sum(int(getattr(x, "batch_size", None) or len(x.dense)) for x in items)


def _shard_frame(request: ShardRequest) -> list:
    """A shard's request on the data plane: [lengths, values, weights | None] (its deadline
    travels in the frame's meta)."""
    return [request.lengths, request.values, request.weights]


def _shard_request(arrays: list, deadline: float | None, version: str | None = None) -> ShardRequest:
    """The inverse of :func:`_shard_frame`."""
    lengths, values, weights = arrays
    return ShardRequest(lengths=lengths, values=values, weights=weights, deadline=deadline, version=version)


async def _lookups_direct(plane: DirectPlane, app: str, requests: dict[int, ShardRequest],
                          version: str) -> dict[int, np.ndarray]:
    """Each shard's pooled embeddings for its request from a replica of model ``version``, over
    the data plane, concurrently (NoReplica when a shard cannot be reached there). The tower's
    calls into its GPU ring: DenseTower._ring_batch."""
    looked = await asyncio.gather(*(plane.call(app, shard_name(k), "lookup", _shard_frame(r), version=version,
                                               deadline=r.deadline)
                                    for k, r in requests.items()))
    return {k: out[0] for k, out in zip(requests, looked)}


def _hedges_counted() -> Callable[[str], None]:
    """DirectPlane's ``on_hedge``: a Prometheus counter of calls sent to a second replica."""
    # Serve reserves the tag "deployment" (it tags every metric with the caller's own deployment)
    hedges = Counter("recserve_dataplane_hedges", tag_keys=("callee",),
                     description="data-plane calls also sent to a second replica: the first was slow to answer")
    return lambda deployment: hedges.inc(tags={"callee": deployment})


def _same_version(component: str, serves: str, wanted: str | None) -> None:
    """A call split by another model version is refused, never answered with this version's
    weights: while Serve updates an application in place (a new package in deploy/serve.yaml)
    old and new replicas share the deployment names and Serve's handles route to either."""
    if wanted is not None and wanted != serves:
        raise ShardUnavailable(component, f"it serves model version {serves!r}, the request was split by version "
                                          f"{wanted!r} (the application is being updated; send it again)")


def _latest_deadline(requests: dict[int, ShardRequest]) -> float | None:
    """The latest deadline (time.time()) among a batch's shard requests; None when none has one."""
    return max((r.deadline for r in requests.values() if r.deadline is not None), default=None)


def _expired(request: ShardRequest) -> bool:
    return request.deadline is not None and time.time() > request.deadline


class _Batcher:
    """Runs a deployment's calls through a :class:`Coalescer` (adaptive: an idle replica runs a
    call at once, calls that arrive meanwhile go together when it returns; one core call at
    a time); a call larger than a batch runs alone. Records each call's wait and batch time
    as stages ``{name}.wait`` and ``{name}.{work}``.

    The core runs on one thread of its own, as the monolith's scoring does: never behind other
    blocking work sent to the event loop's default pool (the fading store, log closes). Timed
    apart, one thread and a pool cost the same per call (benchmarks/tower_thread.py)."""

    def __init__(self, run_many, *, name: str, work: str):
        self.run_many = run_many  # items -> results, on self._thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"recserve-{name}")
        self.config = BatchingConfig()
        self.lock = asyncio.Lock()  # the core (its buffers, its stream) serves one call at a time
        self.coalescer = Coalescer(self._run, max_examples=self.config.max_batch_size,
                                   max_wait_s=self.config.batch_wait_timeout_s)
        self.stages = (f"{name}.wait", f"{name}.{work}")
        self._shed = too_late(name)
        self.observe = ray_observer()
        self._busy = TimeAverage()  # 1 while the core runs a call
        self._running: asyncio.Future | None = None  # that call

    def reconfigure(self, config: dict | None) -> None:
        self.config = BatchingConfig(**(config or {}))
        self.coalescer.configure(max_examples=self.config.max_batch_size,
                                 max_wait_s=self.config.batch_wait_timeout_s, fixed_wait=self.config.fixed_wait)

    async def _run(self, items: list) -> list:
        async with self.lock:
            self._busy.add(1)
            running = self._running = asyncio.get_running_loop().run_in_executor(self._thread, self.run_many, items)
            running.add_done_callback(self._ran)
            try:
                return await asyncio.shield(running)  # a cancel leaves the thread's call to finish
            finally:
                self._busy.add(-1)

    def _ran(self, call: asyncio.Future) -> None:
        _retrieve(call)  # read by its batch, unless that was cancelled
        if self._running is call:
            self._running = None

    async def settled(self) -> None:
        """Returns once the core's calls sent so far have returned (one thread runs them in
        order: the last one sent returns last)."""
        if self._running is not None:
            await asyncio.wait({self._running})

    def utilization(self) -> float:
        """The fraction of the time since the last reading that the core was busy (0-1), the
        call running now counted up to now: what this replica's autoscaling reports. Calls in
        flight do not measure load here: the router coalesces, so a saturated replica may
        have one call in flight at a time (serving/app/autoscaling.py)."""
        return self._busy.mean()

    async def __call__(self, item, *, deadline: float | None = None, expired=TimeoutError):
        """``item``'s result; ``deadline`` (time.time()) as the caller sent it: refused at once
        (RESOURCE_EXHAUSTED) when its batch goes with less time left than a batch takes here."""
        waited: list = []
        left = None if deadline is None else time.monotonic() + (deadline - time.time())
        out = await self.coalescer.submit(item, size=_examples([item]), deadline=left, expired=expired,
                                          waited=waited, shed=self._shed)
        self.observe(self.stages[0], waited[0].queued_s * 1000)
        self.observe(self.stages[1], waited[0].batch_s * 1000)
        return out


_ROUTER_SHED = too_late("the router's batch (the shards and the dense tower)")

# Serve's controller learns that a replica's process died at that replica's next health check
# (a check of a dead actor fails at once), and only then starts its replacement: with one
# replica per shard the period is part of every loss (Serve's default is 10 s). A check is a
# trivial actor call. benchmarks/replica_loss.py, docs/reliability.md.
HEALTH_CHECK_PERIOD_S = 0.5


def keep_grpc_deadlines() -> None:
    """Make Ray Serve's gRPC context keep the caller's deadline (idempotent; in the Router's
    process). Serve copies the gRPC call's metadata into its own context and drops the deadline;
    the ``recserve-timeout-ms`` header then counts from when Predict starts, so a request that
    waited a second in the replica's queues (an overloaded event loop) still looked fresh, was
    admitted, scored, and answered after its caller had given up: past its maximum the stack
    answered 6% of it. The deadline gRPC computed on the call's arrival is kept as wall-clock
    time (``ARRIVAL_DEADLINE_ATTR``; wall clock, because Serve's proxy pickles the context to
    another process, perhaps on another host), and caller_timeout_s reads it."""
    from ray.serve.grpc_util import RayServegRPCContext

    if getattr(RayServegRPCContext, "_recserve_keeps_deadline", False):
        return
    original = RayServegRPCContext.__init__

    def __init__(self, grpc_context, *args, **kwargs):
        original(self, grpc_context, *args, **kwargs)
        try:
            left = grpc_context.time_remaining()
        except Exception:  # noqa: BLE001  a context without a deadline API: the header decides
            left = None
        setattr(self, ARRIVAL_DEADLINE_ATTR, None if left is None else time.time() + left)

    RayServegRPCContext.__init__ = __init__
    RayServegRPCContext._recserve_keeps_deadline = True


def transport_env() -> dict[str, str]:
    """Environment of every replica: Serve's inter-deployment gRPC keeps gRPC's 4 MiB receive
    limit unless told otherwise, and a 4096-example request moves far more than that."""
    return {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}


class _BatchedReplica:
    """What Shard and DenseTower share: their calls run through ``self._batcher`` (Serve's
    user_config sets its batching, their autoscaling reports its busy fraction), and with the
    direct transport they answer on ``self._endpoint``, closed at Serve's graceful stop."""

    _batcher: _Batcher
    _endpoint: ReplicaEndpoint | None = None

    def __del__(self) -> None:
        if self._endpoint is not None:
            self._endpoint.close()

    def reconfigure(self, config: dict) -> None:
        self._batcher.reconfigure(config)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (serving/app/autoscaling.py's BusyPolicy reads it)."""
        return {BUSY_METRIC: self._batcher.utilization()}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class Shard(_BatchedReplica):
    """Shard K of the package: loads only shards/shard-K.safetensors."""

    def __init__(self, package: str, index: int, args: AppArgs):
        if args.torch_threads is not None:  # else Ray's OMP_NUM_THREADS=1
            torch.set_num_threads(args.torch_threads)
        self.name = shard_name(index)
        pkg = ModelPackage.open(package)
        self.version = pkg.manifest.version
        self.core = ShardCore(pkg, index, device=args.resolved_device(),
                              output_dtype=args.wire_dtype, max_batch_size=args.max_batch_size)
        self._batcher = _Batcher(self._lookup_many, name=self.name, work="lookup")
        # Serve tags every metric with its deployment (shard-K), replica and application
        self._batch = Histogram("recserve_shard_batch_examples", description="examples per batched lookup",
                                boundaries=_SIZES)
        self._latency = Histogram("recserve_shard_lookup_ms", description="batched lookup time, ms", boundaries=_MS)
        self._endpoint = (ReplicaEndpoint({"lookup": self._lookup_frame}, version=self.version)
                          if args.transport == "direct" else None)
        # the towers' GPU rings this replica writes into (pooled_transport "ipc")
        self._rings = RingViews(self.core.device) if self._endpoint and self.core.device.type == "cuda" else None

    async def _lookup_frame(self, arrays: list, deadline: float | None) -> list[np.ndarray | None]:
        """The data plane's lookup: [lengths, values, weights | None] -> [pooled]; with a tower's
        ring after them ([..., handle, [offset]]) -> [None], the output written there, when this
        replica can reach the ring (else [pooled], the host path)."""
        request = _shard_request(arrays[:3], deadline)
        target = None
        if len(arrays) == 5 and self._rings is not None:
            target = self._rings.target(arrays[3], int(arrays[4][0]), request.batch_size, self.core.output_dim,
                                        self.core.output_dtype)
        return [await self.lookup(request, target)]

    async def lookup(self, request: ShardRequest, target: torch.Tensor | None = None) -> np.ndarray | None:
        """Pooled embeddings [B, columns x D] (the app's wire dtype) of one request
        (DEADLINE_EXCEEDED if the router's deadline passed before the lookup ran: the work is skipped);
        None once written into ``target`` (a tower's ring on this GPU)."""
        _same_version(self.name, self.version, request.version)
        if _expired(request):
            raise self._late()
        item = _ShardItem(request, target)
        try:
            return await self._batcher(item, deadline=request.deadline, expired=self._late)
        except BaseException:
            if target is not None:  # the tower frees the slot at this answer: nothing may write it after
                item.gone = True  # a lookup that starts from now on leaves the slot alone
                await self._batcher.settled()  # and the one running, which may be writing it, is done
            raise

    def _late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.name}: the request's deadline passed before its lookup ran")

    def _lookup_many(self, items: list[_ShardItem]) -> list[np.ndarray | None | DeadlineExceeded]:
        start = time.perf_counter()
        outs = self.core.lookup_many([it.request for it in items], [None if it.gone else it.target for it in items])
        self._latency.observe((time.perf_counter() - start) * 1000)
        self._batch.observe(_examples(items))
        return outs


@dataclass
class _ShardItem:
    request: ShardRequest
    target: torch.Tensor | None  # [B, columns x D] in a tower's ring, or None: answered by the host
    gone: bool = False  # its caller was answered (an error): a lookup starting now leaves the target alone

    @property
    def batch_size(self) -> int:
        return self.request.batch_size


@dataclass(frozen=True)
class _TowerItem:
    dense: np.ndarray  # float32 [B, F_dense]
    parts: tuple  # per shard: [B, columns x D] (wire dtype) or None (not called)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class DenseTower(_BatchedReplica):
    """Assembles shard outputs into [B, F, D] and runs the dense model."""

    def __init__(self, package: str, shards: list[DeploymentHandle], args: AppArgs):
        torch.set_num_threads(args.tower_threads())
        pkg = ModelPackage.open(package)
        self.version = pkg.manifest.version
        self.routing = Routing(pkg.manifest)
        self.core = TowerCore.from_package(pkg, device=args.resolved_device(), dtype=args.tower_dtype,
                                           input_dtype=args.wire_dtype, max_batch_size=args.max_batch_size)
        # fanout "tower": this deployment calls the shards itself (the router sends it the ids)
        by_reference = args.transport != "grpc"
        self.shards = [h.options(method_name="lookup", _by_reference=by_reference) for h in shards]
        self._batcher = _Batcher(self._score_many, name="tower", work="score")
        self._batch = Histogram("recserve_tower_batch_examples", description="examples per batched tower call",
                                boundaries=_SIZES)
        self._endpoint = self._plane = self._ring = None
        if args.transport == "direct":  # answers the router over the data plane; with fanout "tower" calls the shards there
            self._endpoint = ReplicaEndpoint({"score": self._score_frame, "predict": self._predict_frame},
                                             version=self.version)
            self._plane, self._app = DirectPlane(on_hedge=_hedges_counted()), serve.get_replica_context().app_name
        # the part of each shard in a batch's slot of the ring: [B, columns x D]
        self._widths = {k: len(cols) * self.routing.dim for k, cols in self.routing.columns.items()}
        if self._plane is not None and args.resolved_pooled_transport(str(self.core.device)) == "ipc":
            examples = args.pooled_ring_examples  # a router's largest batch
            self._ring = PooledRing(self.core.device, embedding_dtype(args.wire_dtype), slots=args.pooled_ring_slots,
                                    slot_elems=examples * sum(self._widths.values()))
            logger.info("pooled embeddings: by CUDA IPC into this replica's ring, %d slots of %d examples (%.0f MB)",
                        args.pooled_ring_slots, examples, self._ring.buffer.nbytes / 1e6)
        self._told_declined = False  # a shard answered by the host though offered the ring: logged once
        self._settling: set[asyncio.Future] = set()  # hedged batches' slots waiting for the losers' answers
        self._pooled = Counter("recserve_pooled_batches", tag_keys=("path",),
                               description="batches whose pooled embeddings came over CUDA IPC ('ipc'), by the "
                                           "host because no slot of the ring was free ('host'), because the batch "
                                           "is larger than a slot ('too_large') or because a shard could not reach "
                                           "the ring ('declined'); each batch once")
        self._quarantined = Counter("recserve_pooled_ring_quarantined",
                                    description="ring slots quarantined after their batch: a call to the slot failed, "
                                                "expired or was resent, so it comes back after the calls' deadline "
                                                "(serving/engine/ipc.py)")

    async def _score_frame(self, arrays: list, deadline: float | None) -> list[np.ndarray]:
        """The data plane's score: [dense, part of shard 0 | None, ...] -> [scores]."""
        return [await self.score(arrays[0], *arrays[1:], deadline=deadline)]

    async def score(self, dense: np.ndarray, *parts: np.ndarray | None, version: str | None = None,
                    deadline: float | None = None) -> np.ndarray:
        """Scores float32 [B]; ``parts[k]`` is shard k's output (Serve resolved the responses),
        looked up by model ``version`` (refused when it is not this tower's); ``deadline``
        (time.time()): not scored once it passed (or cannot be met by a batch here)."""
        _same_version("DenseTower", self.version, version)
        return await self._tower(_TowerItem(dense, parts), deadline)

    async def _tower(self, item: _TowerItem, deadline: float | None) -> np.ndarray:
        return await self._batcher(item, deadline=deadline, expired=self._late)

    @staticmethod
    def _late() -> DeadlineExceeded:
        return DeadlineExceeded("DenseTower: the request's deadline passed before it was scored")

    async def _predict_frame(self, arrays: list, deadline: float | None) -> list[np.ndarray]:
        """The data plane's predict: [dense, then per shard lengths, values, weights (None x 3:
        no ids for it)] -> [scores]."""
        dense, rest = arrays[0], arrays[1:]
        # the caller found this replica under its own version's key: the ids are this version's
        requests = {k: _shard_request(rest[3 * k:3 * k + 3], deadline, self.version)
                    for k in range(len(rest) // 3) if rest[3 * k] is not None}
        return [await self.predict(dense, requests)]

    async def predict(self, dense: np.ndarray, requests: dict[int, ShardRequest]) -> np.ndarray:
        """Scores float32 [B] of a split batch: the shards' lookups, then the dense model.
        A shard without ids in the batch is not called (its part stays zero). Over the data
        plane when the transport is "direct" (Serve handles when a shard cannot be reached there)."""
        for r in requests.values():
            _same_version("DenseTower", self.version, r.version)
        if self._plane is not None:
            try:
                return await self._predict_direct(dense, requests)
            except NoReplica:
                pass  # Serve's path below (it knows which replicas died)
        calls = {k: self.shards[k].remote(r) for k, r in requests.items()}
        try:
            done = dict(zip(calls, await asyncio.gather(*calls.values())))
        except BaseException:
            cancel(*calls.values())
            raise
        return await self._tower(_TowerItem(dense, self._parts(done)), _latest_deadline(requests))

    async def _predict_direct(self, dense: np.ndarray, requests: dict[int, ShardRequest]) -> np.ndarray:
        """:meth:`predict` over the data plane; the pooled embeddings into a slot of this
        replica's GPU ring when it has one and a slot is free (serving/engine/ipc.py)."""
        B = int(dense.shape[0])
        lease = None
        if self._ring is not None and requests:
            widths = {k: self._widths[k] for k in requests}
            lease = self._ring.lease(B, widths)
            if lease is None:
                self._pooled.inc(tags={"path": "host" if self._ring.fits(B, widths) else "too_large"})
        if lease is None:
            done = await _lookups_direct(self._plane, self._app, requests, self.version)
            return await self._tower(_TowerItem(dense, self._parts(done)), _latest_deadline(requests))
        # the slot is free again once nothing writes or reads it: every shard called has answered (a
        # hedged call: both replicas) and the score that reads it has returned. So when this call is
        # cancelled (its deadline passed) that work runs on, unscored, and frees the slot; only a call
        # left unanswered (a broken connection, a resend) quarantines it. Quarantined at every cancel,
        # slots ran out under overload and the batches fell back to the host path (H100, 550 req/s:
        # 60% of them)
        gone = asyncio.Event()  # set when the caller stops waiting
        work = asyncio.ensure_future(self._ring_batch(dense, requests, lease, gone))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            gone.set()
            work.add_done_callback(_retrieve)
            raise

    async def _ring_batch(self, dense: np.ndarray, requests: dict[int, ShardRequest], lease,
                          gone: asyncio.Event) -> np.ndarray | None:
        """:meth:`_predict_direct`'s batch by the ring's slot ``lease``: its scores (None once
        ``gone``: not scored), the slot settled at the end."""
        B = int(dense.shape[0])
        unanswered = True
        try:
            calls = {k: asyncio.ensure_future(self._plane.call(
                         self._app, shard_name(k), "lookup",
                         _shard_frame(r) + [self._ring.handle, np.array([lease.offsets[k]], np.int64)],
                         version=self.version, deadline=r.deadline, on_resend=lease.abandon))
                     for k, r in requests.items()}
            await asyncio.wait(calls.values())  # every one: a shard still looking up may still write
            unanswered = not all([answered(c) for c in calls.values()])  # a list: every error read
            done = {k: c.result()[0] for k, c in calls.items()}  # the first error, raised
            declined = sorted(k for k, out in done.items() if out is not None)
            if declined and not self._told_declined:
                logger.warning("pooled embeddings: shards %s answered by the host, though offered the ring (another "
                               "GPU or host: their logs say why)", declined)
                self._told_declined = True
            # each batch counted once, by how its embeddings came: a declined one is not also an 'ipc' one
            self._pooled.inc(tags={"path": "declined" if declined else "ipc"})
            if gone.is_set():
                return None
            parts = {k: self._ring.view(lease, k, B, self._widths[k]) if out is None else out
                     for k, out in done.items()}
            return await self._tower(_TowerItem(dense, self._parts(parts)), _latest_deadline(requests))  # synced
        finally:
            deadline = _latest_deadline(requests)
            if lease.racing and not unanswered and not lease.abandoned:  # hedged: the losers answer later
                settling = asyncio.ensure_future(self._settle_answered(lease, deadline))
                self._settling.add(settling)  # a reference: asyncio keeps none
                settling.add_done_callback(self._settling.discard)
            else:
                self._settle(lease, unanswered, deadline)

    def _settle(self, lease, unanswered: bool, deadline: float | None) -> None:
        if self._ring.settle(lease, failed=unanswered, deadline=deadline):
            self._quarantined.inc()

    async def _settle_answered(self, lease, deadline: float | None) -> None:
        """A hedged batch's slot, once the calls that lost their races have answered too (one
        still unanswered at the fence's time, a replica that stopped, is dropped: the slot is
        quarantined)."""
        every_one = await all_answered(lease.racing, deadline)
        for call in lease.racing:
            call.cancel()  # its channel forgets the call
        self._settle(lease, not every_one, deadline)

    def _parts(self, done: dict) -> tuple:
        """Shard outputs in shard order, None for a shard not called."""
        return tuple(done.get(k) for k in range(self.routing.num_shards))

    def _score_many(self, items: list[_TowerItem]) -> list[np.ndarray]:
        self._batch.observe(_examples(items))
        sparse = self.routing.assemble_many([(it.batch_size, it.parts) for it in items],
                                            device=self.core.device)  # [sum B, F, D]
        dense = np.concatenate([it.dense for it in items]) if len(items) > 1 else items[0].dense
        scores = self.core.score(dense, sparse)  # [sum B]
        return np.split(scores, np.cumsum([it.batch_size for it in items])[:-1])


@dataclass(frozen=True)
class _VersionParts:
    """A router's handles and edge state for one version (its shards and tower live in ``app``)."""

    manifest: object  # Manifest
    spec: ModelSpec
    routing: Routing
    shards: list  # DeploymentHandle per shard, method lookup
    tower: DeploymentHandle  # method score (fanout "router")
    tower_predict: DeploymentHandle  # method predict (fanout "tower")
    feature_filter: FeatureFilter
    example_log: object


class _ReplicaDied(Exception):
    """A call failed because a replica died while the deployment still has others: retry."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _depth_teller(gauge: Gauge, front_socket: str):
    """``on_depth`` for the Router's door: the depth into ``gauge``, and told to the front on
    ``front_socket`` (if any). A front that cannot be reached (starting, stopping) is told at the
    next change."""
    front = None
    if front_socket:
        from serving.ops.front_control import depth_teller

        front = depth_teller(front_socket)

    def tell(line: int, calls: int) -> None:
        gauge.set(calls)
        if front is not None:
            front(line, calls)

    return tell


# max_ongoing_requests/max_queued_requests: from AppArgs (router_door: the stack's max_in_flight and max_queued shared; builder._router);
# beyond both, Serve answers RESOURCE_EXHAUSTED at the door (direct ingress) or in the proxy (BackPressureError)
@serve.deployment(ray_actor_options={"num_cpus": 0})
class Router:
    """gRPC ingress: admit (or shed) -> pick the version -> decode + validate -> feature
    filter -> split -> shards -> tower -> encode.

    Versions (serving/app/versions.py): the router serves every version in the table kept in
    Ray's GCS for its app (``set_versions`` swaps it in one assignment); without a table it
    serves the package it was built with, from its own app. Admission (serving/engine/admission.py)
    sheds with RESOURCE_EXHAUSTED before decoding when a request cannot be answered in time.
    A call that fails because a replica died is retried (on another replica) within the
    deadline: scoring is idempotent."""

    def __init__(self, package: str, shards: list[DeploymentHandle], tower: DeploymentHandle, args: AppArgs):
        self.args = args
        keep_grpc_deadlines()  # before the first request: direct ingress builds its context here
        quiet_overload_logs()
        self.app = serve.get_replica_context().app_name
        self._bound = (shards, tower)  # this app's own shards and tower (no table: a single-app stack)
        manifest = ModelPackage.open(package).manifest  # the manifest only: the router holds no tables
        table = load_table(self.app) or VersionTable(
            live=manifest.version, packages={manifest.version: package}, apps={manifest.version: self.app})
        self._example_logs: list = []  # every version's, until it is closed (a retired version's once drained)
        self._retiring: set[asyncio.Task] = set()  # closing retired versions' logs
        self.versions = RouterVersions(self._version_parts, table)
        # the latency bound from 4 requests in flight on: shards and tower overlap that many
        working, waiting = args.router_door()  # this replica's share of the stack's door
        self.admission = Admission(AdmissionConfig(max_in_flight=working, min_in_flight=4,
                                                   max_latency_factor=args.max_latency_factor))
        self._status_cache: dict[str, tuple[float, dict[str, int]]] = {}
        self._status_lookup: dict[str, asyncio.Future] = {}  # per app: the look under way, if any
        self._ready_apps: set[str] = set()  # applications Serve has reported RUNNING once
        self._requests = Counter("recserve_requests", description="Predict requests by gRPC code",
                                 tag_keys=("code",))
        self._latency = Histogram("recserve_request_ms", description="Predict time in the router, ms",
                                  boundaries=_MS)
        self._fanout = Histogram("recserve_shards_per_request", description="shards called per request",
                                 boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32])
        self._examples = Histogram("recserve_request_examples", description="examples per request",
                                   boundaries=_SIZES)
        self._retries = Counter("recserve_replica_retries", description="calls retried after a replica died")
        # transport "direct": shards and tower over the data plane; Serve handles when it cannot reach them
        self._plane = DirectPlane(on_hedge=_hedges_counted()) if args.transport == "direct" else None
        self._sent = {"direct": 0, "serve": 0}  # coalesced batches by path
        self._fallbacks = Counter("recserve_dataplane_fallbacks",
                                  description="batches sent through Serve handles: no replica reachable on the data plane")
        # concurrent requests of one version: one split, one call per shard, one tower call
        self._coalescer = Coalescer(self._score_batch, max_examples=args.coalesce_max_examples,
                                    max_wait_s=args.coalesce_wait_s, isolate=_isolate, cancel_abandoned=True,
                                    pipeline=args.coalesce_pipeline)
        self._observe = ray_observer()
        # --ingress shared: this replica answers the stack's one address itself (serving/app/grpc_ingress.py);
        # Serve runs __init__ on the replica's event loop, where the server's handlers then run
        self._door_depth = Gauge("recserve_router_door_depth",
                                 description="requests this router's door takes now, working and waiting (with "
                                             "adaptive_door: the knee of its throughput)")
        self._ingress = start_ingress(args.router_listen(), predict=self.Predict, model_info=self.ModelInfo,
                                      check=self.Check, max_in_flight=working,
                                      max_queued=waiting, observe=self._observe,
                                      adaptive=args.adaptive_door,
                                      on_depth=_depth_teller(self._door_depth, args.front_socket)) \
            if args.grpc_listen else None

    def check_health(self) -> None:
        """Serve's periodic health check (every 10 s): the door's depth reported again, so the gauge
        has a sample however long ago the depth last changed."""
        if getattr(self, "_ingress", None) is not None:
            self._door_depth.set(self._ingress.depth())

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """With its own gRPC server (--ingress shared) Serve sees none of this replica's requests:
        the mean in its door since the last report, for serving/app/autoscaling.py's InFlightPolicy
        (nothing otherwise: Serve counts them itself)."""
        return {IN_FLIGHT_METRIC: self._ingress.load()} if self._ingress is not None else {}

    async def __del__(self) -> None:
        """Serve's graceful stop of this replica (``recserve serve`` on SIGTERM or Ctrl-C, a
        swap that retires the router's app, a scale-down): stop taking calls on the shared port
        and let those in flight finish (Serve's own drain does not see them), then write the rows
        the example logs still queue, retired versions' included. Serve ends the actor with
        ray.kill right after, where no atexit handler runs."""
        if getattr(self, "_ingress", None) is not None:
            await self._ingress.stop(grace=INGRESS_GRACE_S)
        for log in getattr(self, "_example_logs", ()):
            log.close()

    def _version_parts(self, version: str, package: str, app: str) -> ServedVersion:
        manifest = ModelPackage.open(package).manifest
        if manifest.version != version:
            raise ValueError(f"{package}: holds version {manifest.version!r}, the version table says {version!r}")
        if app == self.app:
            shards, tower = self._bound
        else:
            # not checked with the controller: recserve serve starts the router before the first
            # version's app (rollout.start_stack), and a handle finds the deployments once they run
            shards = [serve.get_deployment_handle(shard_name(sh.index), app_name=app, _check_exists=False)
                      for sh in manifest.plan.shards]
            tower = serve.get_deployment_handle("DenseTower", app_name=app, _check_exists=False)
        by_reference = self.args.transport != "grpc"
        parts = _VersionParts(
            manifest=manifest,
            spec=ModelSpec.of(manifest, max_batch_size=self.args.max_batch_size),
            routing=Routing(manifest),
            shards=[h.options(method_name="lookup", _by_reference=by_reference) for h in shards],
            tower=tower.options(method_name="score", _by_reference=by_reference),
            tower_predict=tower.options(method_name="predict", _by_reference=by_reference),
            feature_filter=load_feature_filter(self.args.feature_filter, manifest),
            example_log=example_log_for(config_of(self.args), manifest),  # off unless log_rate > 0
        )
        self._example_logs.append(parts.example_log)
        return ServedVersion(version=version, app=app, manifest=manifest, parts=parts)

    # ------------------------------------------------------------------ control (serving/app/versions.py)

    async def set_versions(self, table_json: str) -> str:
        """Serve the versions of this table from now on; returns the live version.

        Async, so it runs on the replica's event loop: a new version's handles are made here, and
        with Serve's direct ingress (same-loop routing) a handle can only be made inside a
        running loop (Serve runs a sync method in a thread, where making one raises).

        A version the table drops keeps its requests in flight to the end; then its example
        log writes what it queues and its writer stops."""
        before = self.versions.served
        live = self.versions.apply(VersionTable.from_json(table_json))
        for version, served in before.items():
            if self.versions.served.get(version) is not served:
                self._retiring.add(asyncio.ensure_future(self._close_log_when_drained(served)))
        return live

    async def _close_log_when_drained(self, served: ServedVersion) -> None:
        while self.versions.in_flight.get(served.version, 0) > 0 and self.versions.served.get(served.version) is None:
            await asyncio.sleep(0.05)
        log = served.parts.example_log
        await asyncio.to_thread(log.close)
        self._example_logs.remove(log)
        self._retiring.discard(asyncio.current_task())

    def version_table(self) -> str:
        """The table this replica serves (JSON)."""
        return self.versions.table.to_json()

    def coalesced(self) -> dict[str, int]:
        """Batches this replica has sent and the requests they carried (coalescing at work)."""
        return {"batches": self._coalescer.batches, "items": self._coalescer.items}

    def data_plane(self) -> dict[str, int]:
        """Batches this replica sent over the data plane ("direct") and through Serve handles ("serve"),
        and its data-plane calls sent to a second replica ("hedged") and answered there first ("hedges_won")."""
        plane = self._plane
        return {**self._sent, "hedged": plane.hedges if plane else 0, "hedges_won": plane.hedges_won if plane else 0}

    def in_flight(self, version: str) -> int:
        """Requests on ``version`` in this replica now (the old version drains to 0)."""
        return self.versions.in_flight.get(version, 0)

    # ------------------------------------------------------------------ gRPC methods

    async def Predict(self, request, grpc_context=None):
        from recserve.v1 import ranker_pb2

        start = time.monotonic()
        clock = Stopwatch(self._observe)
        token = routing_module.REQUEST_ID.set(request.request_id)
        ticket = served = None
        answered = expired = False
        try:
            budget = caller_timeout_s(grpc_context, self.args.default_timeout_s)
            if budget <= 0:  # it waited out its deadline in this replica's queues: no work for it
                raise DeadlineExceeded("the deadline passed before the router could start the request "
                                       "(it waited in the router's queue: overloaded)")
            deadline = start + budget
            served = self.versions.pick(request.version)  # one version from here to the scores
            p = served.parts
            check_model(p.spec, request.model, request.version)
            ticket = self.admission.admit(min(int(request.batch_size), p.spec.max_batch_size), budget)
            self.versions.enter(served.version)
            clock.lap("admission")
            batch = decode_request(request, p.spec)
            self._examples.observe(batch.batch_size)
            clock.lap("decode")
            scores = await self.score(batch, deadline, p, app=served.app, budget_s=budget, clock=clock)
            p.example_log.submit(request.request_id, batch, scores, p.feature_filter)  # never blocks
            response = encode_response(scores, model=p.manifest.name, version=p.manifest.version,
                                       request_id=request.request_id)
            clock.lap("encode")
            answered = True
            self._requests.inc(tags={"code": "OK"})
            return response
        except asyncio.CancelledError:  # the caller went away: its own deadline, as a rule
            expired = True
            raise
        except Exception as e:  # noqa: BLE001  the edge: every error leaves with its code
            code = self._fail(grpc_context, e)
            expired = code.name == "DEADLINE_EXCEEDED"
            self._requests.inc(tags={"code": code.name})
            return ranker_pb2.PredictResponse()
        finally:
            routing_module.REQUEST_ID.reset(token)
            if ticket is not None:
                self.versions.leave(served.version)
                self.admission.done(ticket, answered=answered, expired=expired)
            self._latency.observe((time.monotonic() - start) * 1000)

    async def ModelInfo(self, request, grpc_context=None):
        from recserve.v1 import ranker_pb2

        try:
            live = self.versions.live
            p = live.parts
            check_model(p.spec, request.model)
            starting = await self._starting(live.app)
            if starting:
                raise ShardUnavailable(live.app, starting)
            return model_info(p.manifest, max_batch_size=p.spec.max_batch_size)
        except Exception as e:  # noqa: BLE001
            self._fail(grpc_context, e)
            return ranker_pb2.ModelInfoResponse()

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check for "" and "recserve.v1.Ranker"."""
        from grpc_health.v1 import health_pb2

        if request.service not in HEALTH_SERVICES:
            import grpc

            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        serving = not await self._starting(self.versions.live.app)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if serving else
                                              health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _starting(self, app: str) -> str | None:
        """Why the live version's application cannot score yet (None once Serve has reported it
        RUNNING, remembered). `recserve serve` starts the router first (rollout.start_stack):
        until then ModelInfo and health say the stack is starting, so a client that waits for
        them never sends its first request into shards that are not up."""
        if app in self._ready_apps:
            return None

        def look() -> str | None:
            from ray.serve.schema import ApplicationStatus

            status = serve.status().applications.get(app)
            if status is not None and status.status == ApplicationStatus.RUNNING:
                return None
            return f"starting: application {app} is {status.status.value if status else 'not deployed yet'}"

        reason = await asyncio.to_thread(look)
        if reason is None:
            self._ready_apps.add(app)
        return reason

    # ------------------------------------------------------------------ the request path

    async def score(self, batch, deadline: float, p: _VersionParts, *, app: str,
                    budget_s: float | None = None, clock: Stopwatch | None = None) -> np.ndarray:
        """Scores float32 [B] of a validated batch by one version, within ``deadline``
        (time.monotonic()): filtered, then coalesced with concurrent requests of the same
        version (:meth:`_score_batch`); it waits for its own scores until its own deadline.

        ``budget_s`` is the caller's whole budget (for the error message)."""
        started = time.monotonic()
        batch = p.feature_filter(batch)  # THE fading hook: on the decoded batch, before the split
        if clock is not None:
            clock.lap("filter")
        budget = budget_s if budget_s is not None else deadline - started
        waited: list = []
        scores = await self._coalescer.submit(
            (batch, p, app, deadline, budget), size=batch.batch_size, key=(app, p.manifest.version), deadline=deadline, waited=waited,
            expired=lambda: DeadlineExceeded(f"deadline of {budget * 1000:.0f} ms exceeded waiting for the shards "
                                              f"and the dense tower"),
            shed=_ROUTER_SHED)
        if clock is not None:
            clock.add("coalesce_wait", waited[0].queued_s)
            clock.add("batch", waited[0].batch_s)
        routing_module.observe_scores(p.feature_filter, batch, scores, time.monotonic() - started)  # fading guardrails
        return scores

    async def _score_batch(self, items: list[tuple]) -> list[np.ndarray]:
        """Scores of coalesced requests of one version: one split, one call per shard, one
        tower call, within the latest of their deadlines (each request keeps its own in
        :meth:`score`); a call that lost its replica is sent again while time is left."""
        _, p, app, _, _ = items[0]
        batches = [b for b, *_ in items]
        batch = concat_batches(batches)
        deadline = max(it[3] for it in items)  # time.monotonic(); each request's own ends its wait
        budget = max(it[4] for it in items)  # the caller's, for the message
        requests = p.routing.split(batch, deadline=time.time() + (deadline - time.monotonic()))
        self._fanout.observe(len(requests))
        for attempt in itertools.count():
            try:
                scores = await self._call(batch, requests, deadline, p, app, budget)
                break
            except _ReplicaDied as died:
                pause = min(0.005 * 2**attempt, 0.1)  # the handle drops the dead replica; go again
                if deadline - time.monotonic() < 2 * pause:
                    raise died.error from None
                self._retries.inc()
                await asyncio.sleep(pause)
        return split_rows(scores, [b.batch_size for b in batches])

    async def _call(self, batch, requests: dict[int, ShardRequest], deadline: float, p: _VersionParts, app: str,
                    budget_s: float | None) -> np.ndarray:
        calls: dict[int, DeploymentResponse] = {}
        if self._plane is not None:
            try:
                scores = await self._call_direct(batch, requests, deadline, p, app, budget_s)
                self._sent["direct"] += 1
                return scores
            except NoReplica:
                self._fallbacks.inc()  # not registered yet, or none reachable: Serve's path (it knows who died)
        self._sent["serve"] += 1
        if self.args.resolved_fanout() == "tower":  # the tower calls the shards: pooled embeddings never come here
            tower_call = p.tower_predict.remote(batch.dense, requests)
        else:  # shard responses handed on to the tower (by reference: through the object store)
            calls = {k: p.shards[k].remote(r) for k, r in requests.items()}
            tower_call = p.tower.remote(batch.dense, *[calls.get(k) for k in range(p.routing.num_shards)],
                                        version=p.manifest.version)
        try:
            return await self._await(asyncio.ensure_future(_resolve(tower_call)), sorted(requests), deadline, app,
                                     budget_s)
        except BaseException:
            cancel(tower_call, *calls.values())
            raise

    async def _call_direct(self, batch, requests: dict[int, ShardRequest], deadline: float, p: _VersionParts,
                           app: str, budget_s: float | None) -> np.ndarray:
        """The shards, then the tower, over the data plane, within ``deadline``; NoReplica when a
        deployment cannot be reached there."""
        version = p.manifest.version

        async def chain() -> np.ndarray:
            looked = await _lookups_direct(self._plane, app, requests, version)
            parts = [looked.get(k) for k in range(p.routing.num_shards)]
            return (await self._plane.call(app, "DenseTower", "score", [batch.dense, *parts], version=version))[0]

        async def via_tower() -> np.ndarray:  # fanout "tower": the pooled embeddings never come here
            ids = []
            for k in range(p.routing.num_shards):
                r = requests.get(k)
                ids += [None, None, None] if r is None else _shard_frame(r)
            sent_deadline = next(iter(requests.values())).deadline if requests else None
            return (await self._plane.call(app, "DenseTower", "predict", [batch.dense, *ids], version=version,
                                           deadline=sent_deadline))[0]

        work = via_tower() if self.args.resolved_fanout() == "tower" else chain()
        return await self._await(asyncio.ensure_future(work), sorted(requests), deadline, app, budget_s)

    async def _await(self, result: asyncio.Future, shards: list[int], deadline: float, app: str,
                     budget_s: float | None = None):
        """The tower's result (``result``: the Serve call, or the data plane's calls), or
        DEADLINE_EXCEEDED, or UNAVAILABLE as soon as a shard it waits on is known to be down
        (checked once the call has taken shard_down_after_s: a shard with no replica leaves a
        Serve handle call waiting, and the tower's with it); _ReplicaDied when a replica died
        under the call but its deployment has others; NoReplica from the data plane as it is."""
        budget = budget_s if budget_s is not None else deadline - time.monotonic()
        late = (f"deadline of {budget * 1000:.0f} ms exceeded waiting for "
                f"{', '.join(shard_name(k) for k in shards) or 'no shard'} and the dense tower")
        check_at = time.monotonic() + self.args.shard_down_after_s
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise DeadlineExceeded(late)
                done, _ = await asyncio.wait({result}, timeout=max(min(deadline, check_at) - now, 0.0))
                if done:
                    try:
                        return result.result()
                    except Exception as e:  # noqa: BLE001
                        error = _as_serving_error(e)
                        if isinstance(error, DeadlineExceeded):  # a replica's, as the deadline came: the caller's words
                            raise DeadlineExceeded(f"{late} ({error.message})") from e
                        if isinstance(error, ShardUnavailable):  # down for good (named), or retry elsewhere
                            await self._check_shards_alive(shards, app, fresh=True)
                            raise _ReplicaDied(error) from e
                        raise error from e
                if time.monotonic() >= check_at:
                    await self._check_shards_alive(shards, app)
                    check_at = time.monotonic() + 0.5
        finally:
            if not result.done():
                result.cancel()  # Serve answers it with RequestCancelledError: retrieved, never logged
                result.add_done_callback(_retrieve)

    async def _check_shards_alive(self, shards: list[int], app: str, *, fresh: bool = False) -> None:
        """UNAVAILABLE if a shard this request waits on has no running replica."""
        running = await self._running_replicas(app, fresh=fresh)
        if running is None:  # the app is still deploying: its replicas are starting, not down
            return
        for k in shards:
            if running.get(shard_name(k), 0) == 0:
                raise ShardUnavailable(shard_name(k), "no running replica")
        if running.get("DenseTower", 0) == 0:
            raise ShardUnavailable("DenseTower", "no running replica")

    async def _running_replicas(self, app: str, *, fresh: bool = False) -> dict[str, int] | None:
        """Replicas per deployment of ``app`` that the controller reports RUNNING and whose
        actor is still alive (the controller notices a dead replica only at its next health
        check; the actor's name leaves Ray's registry as soon as it dies); None while the app
        is still deploying (right after start-up: nothing is down yet)."""
        at, cached = self._status_cache.get(app, (0.0, {}))
        if not fresh and time.monotonic() - at < 0.5:
            return cached
        # single flight: concurrent slow requests share one look (it pickles Serve's status),
        # shielded so that a request that gives up does not cancel it for the others
        lookup = self._status_lookup.get(app)
        if lookup is None or lookup.done():
            lookup = self._status_lookup[app] = asyncio.ensure_future(self._look_up_replicas(app))
        return await asyncio.shield(lookup)

    async def _look_up_replicas(self, app: str) -> dict[str, int] | None:
        def look() -> dict[str, int] | None:
            import ray
            from ray.serve.context import _get_global_client

            # the controller's details as it sends them (JSON-ready), not serve.status(): that parses
            # them into pydantic models, cloudpickling every deployment's request-router config, 95%
            # of this look's CPU (benchmarks/results/profile-dlrmv2-2core) on a router whose calls are slow
            client = _get_global_client(raise_if_no_controller_running=False)
            details = client.get_serve_details().get("applications", {}).get(app) if client is not None else None
            if details is None or details["status"] in ("DEPLOYING", "NOT_STARTED"):
                return None  # not handed to Serve yet (the router starts first) or still starting
            alive = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            running = {}
            for name, d in details.get("deployments", {}).items():
                actors = sum(1 for a in alive if f"{app}#{name}#" in a)
                states = [r["state"] for r in d.get("replicas", [])]
                running[name] = min(states.count("RUNNING"), actors)
            return running

        running = await asyncio.to_thread(look)
        self._status_cache[app] = (time.monotonic(), running)
        return running

    # ------------------------------------------------------------------ helpers

    def _fail(self, grpc_context, error: BaseException):
        """Set the status of a failed call on the gRPC context; returns the code."""
        error = _as_serving_error(error)
        code, message = grpc_status(error)
        if not isinstance(error, ServingError):
            logger.exception("recserve: request failed", exc_info=error)
        if grpc_context is not None:
            grpc_context.set_code(code)
            grpc_context.set_details(message)
        return code


def _isolate(error: BaseException) -> bool:
    """Whether a coalesced batch that failed with ``error`` is rerun request by request (an
    error one request may have caused), not failed as a whole (the stack's own state)."""
    return not isinstance(_as_serving_error(error), (DeadlineExceeded, ShardUnavailable, Overloaded))


def cancel(*responses: DeploymentResponse) -> None:
    """Cancel Serve calls whose result is no longer wanted, best effort: Ray 2.60's
    ``DeploymentResponse.cancel()`` raises the call's own error when it already failed (a shard
    that died under it), and from a cleanup path that error would replace the one being
    handled (a retry turned into a failed request)."""
    for r in responses:
        try:
            r.cancel()
        except Exception:  # noqa: BLE001  the call failed already: nothing left to cancel
            pass


async def _resolve(response: DeploymentResponse):
    return await response


def _retrieve(task: asyncio.Future) -> None:
    """Take an abandoned task's outcome, so asyncio does not log it ("Task exception was never
    retrieved", a traceback formatted per abandoned request: under overload, a share of the
    router's CPU spent on logs)."""
    if not task.cancelled():
        task.exception()


class _QuietCancels(logging.Filter):
    """Drops Serve's INFO line for each cancelled handle call ("Cancelling request that has
    already been assigned to a replica."): the router cancels the calls of every request that
    gives up, and under overload the line was written hundreds of times a second."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith("Cancelling request that has already"))


def quiet_overload_logs() -> None:
    """In the router's process: no log line per abandoned call (idempotent). Also Ray's
    "Unhandled error" report of shard results nobody read: the tower call that held them was
    cancelled, and the error that matters reached the caller through the tower's own result."""
    import os

    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    if not any(isinstance(f, _QuietCancels) for f in logger.filters):
        logger.addFilter(_QuietCancels())


def _as_serving_error(error: BaseException) -> BaseException:
    """Ray and Serve failures as typed serving errors (a shard's own ServingError passes through)."""
    while isinstance(error, RayTaskError) and error.cause is not None:  # a shard's error through the tower
        error = error.cause
    if isinstance(error, ServingError):
        return error
    if isinstance(error, BackPressureError):
        return Overloaded(error.message)
    if isinstance(error, (TaskCancelledError, asyncio.CancelledError)):
        return DeadlineExceeded("request cancelled before it finished")
    if isinstance(error, _DOWN_ERRORS) or (
        isinstance(error, RayServeException) and isinstance(error.__cause__, _DOWN_ERRORS)
    ):
        return ShardUnavailable("a shard or the dense tower", str(error).splitlines()[0][:300])
    return error
