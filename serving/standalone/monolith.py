"""The single-server baseline: the whole model in one process behind a plain grpc.aio
server speaking the same Ranker API (plus grpc.health.v1), no Ray. Same cores as the
sharded app (serving/engine/local_ranker.py); the load-test issue compares the two.

Use::

    server, port = await create_server("artifacts/default", port=0)   # bound and started
    ...
    await server.stop(grace=1.0)

or, from synchronous code (tests, benchmarks)::

    with MonolithThread("artifacts/default") as running:
        client = RankingClient(f"127.0.0.1:{running.port}")
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from recserve.package import ModelPackage
from recserve.v1 import ranker_pb2_grpc
from serving.engine.admission import Admission, AdmissionConfig
from serving.api.codec import check_model, decode_request, encode_response, model_info
from serving.api.errors import DeadlineExceeded
from serving.api.wire import HEALTH_SERVICES, add_ranker_servicer, behind_door, caller_timeout_s
from serving.config import DEFAULT_MAX_BATCH_SIZE, AppArgs
from serving.engine.coalesce import Coalescer, concat_batches, split_rows, too_late
from serving.engine.concurrency import may_wait
from serving.engine.door import Door
from serving.engine.local_ranker import LocalRanker
from serving.engine.stages import Stopwatch, prometheus_observer
from serving.example_log import OFF, ExampleLog, ExampleLogConfig, NoLog, example_log_for
from serving.engine.routing import REQUEST_ID, FeatureFilter, identity_filter, observe_scores
from serving.api.status import grpc_status
from serving.ops.server_thread import ServerThread, serve_until_signalled

DEFAULT_COALESCE_EXAMPLES: int = AppArgs.model_fields["coalesce_max_examples"].default
DEFAULT_TORCH_THREADS: int | None = AppArgs.model_fields["torch_threads"].default
_SHED = too_late("scoring")


class MonolithServicer(ranker_pb2_grpc.RankerServicer):
    """Thin: check the model, admit (or shed), decode, filter, score on the worker threads,
    encode; errors leave through context.abort.

    Scoring runs on ``workers`` threads. Concurrent requests are coalesced (serving/engine/coalesce.py):
    one that finds nothing being scored goes at once; those arriving meanwhile are scored
    together (one split, one lookup per shard, one tower call) when it returns. Admission
    (serving/engine/admission.py) sheds with RESOURCE_EXHAUSTED before decoding when a request
    cannot be answered within its deadline (or ``max_latency_factor`` x the idle latency),
    and a request whose deadline passes while it waits is never scored. Per-stage times go
    to the ``recserve_stage_ms`` histogram (serving/engine/stages.py)."""

    def __init__(self, ranker: LocalRanker, *, admission: AdmissionConfig | None = None, workers: int = 1,
                 example_log: ExampleLog | NoLog = OFF, coalesce_max_examples: int = DEFAULT_COALESCE_EXAMPLES,
                 door: Door | None = None):
        self.ranker = ranker
        # ``door``: Predict behind it (serving/engine/door.py: the adaptive door); None: gRPC's own
        # maximum_concurrent_rpcs is the door
        self._behind_door = None if door is None else behind_door(door, self._predict)
        self.example_log = example_log
        self.admission = Admission(admission or AdmissionConfig())
        self.workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recserve-score")
        self.coalescer = Coalescer(self._score_many, max_examples=coalesce_max_examples)
        self.observe = prometheus_observer()

    def _filter(self, batch, deadline: float | None):
        if deadline is not None and time.monotonic() >= deadline:  # waited out its deadline in the queue
            raise DeadlineExceeded("deadline expired while the request waited for a worker")
        return self.ranker.feature_filter(batch)

    async def _score_many(self, batches: list) -> list:
        """Filtered batches of several requests scored as one (on a worker thread)."""
        def score():
            merged = concat_batches(batches)
            return split_rows(self.ranker.score_filtered(merged, self.observe), [b.batch_size for b in batches])

        return await asyncio.get_running_loop().run_in_executor(self.workers, score)

    async def Predict(self, request, context):
        if self._behind_door is not None:
            return await self._behind_door(request, context)
        return await self._predict(request, context)

    async def _predict(self, request, context):
        started = time.monotonic()
        clock = Stopwatch(self.observe)
        token = REQUEST_ID.set(request.request_id)  # copied into the filter's thread by contextvars
        ticket = None
        answered = expired = False
        try:
            left = caller_timeout_s(context)
            check_model(self.ranker.spec, request.model, request.version)
            examples = min(int(request.batch_size), self.ranker.spec.max_batch_size)
            ticket = self.admission.admit(examples, left)  # sheds before any decoding work
            clock.lap("admission")
            batch = decode_request(request, self.ranker.spec)
            clock.lap("decode")
            deadline = None if left is None else started + left
            filtered = batch
            if self.ranker.feature_filter is not identity_filter:  # on a worker: it may do I/O
                call = functools.partial(contextvars.copy_context().run, self._filter, batch, deadline)
                filtered = await self._within(asyncio.get_running_loop().run_in_executor(self.workers, call),
                                              deadline, left)
            clock.lap("filter")
            waited: list = []
            expired = functools.partial(DeadlineExceeded, f"deadline of {(left or 0) * 1000:.0f} ms exceeded while scoring")
            scores = await self.coalescer.submit(filtered, size=filtered.batch_size, deadline=deadline,
                                                 expired=expired, waited=waited, shed=_SHED)
            clock.add("coalesce_wait", waited[0].queued_s)
            clock.add("batch", waited[0].batch_s)
            observe_scores(self.ranker.feature_filter, filtered, scores, time.monotonic() - started)
            m = self.ranker.package.manifest
            response = encode_response(scores, model=m.name, version=m.version, request_id=request.request_id)
            clock.lap("encode")
            answered = True
        except asyncio.CancelledError:  # the caller went away: its own deadline, as a rule
            expired = True
            raise
        except Exception as e:  # noqa: BLE001  the edge: every error leaves with its code
            code, message = grpc_status(e)
            expired = code == grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(code, message)
        finally:
            REQUEST_ID.reset(token)
            if ticket is not None:
                self.admission.done(ticket, answered=answered, expired=expired)
        self.example_log.submit(request.request_id, batch, scores, self.ranker.feature_filter)  # never blocks
        return response

    @staticmethod
    async def _within(work: asyncio.Future, deadline: float | None, left: float | None):
        """``work``'s result, or DEADLINE_EXCEEDED at ``deadline`` (the work itself runs on)."""
        if deadline is None:
            return await asyncio.shield(work)
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            work.add_done_callback(lambda w: w.cancelled() or w.exception())  # retrieved: the caller has its error
            raise DeadlineExceeded(f"deadline of {left * 1000:.0f} ms exceeded while scoring") from None

    async def ModelInfo(self, request, context):
        try:
            check_model(self.ranker.spec, request.model)
        except Exception as e:  # noqa: BLE001
            code, message = grpc_status(e)
            await context.abort(code, message)
        return model_info(self.ranker.package.manifest, max_batch_size=self.ranker.spec.max_batch_size)


async def create_server(
    package: ModelPackage | str,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_in_flight: int = 16,
    max_queued: int = 1,
    adaptive_door: bool = False,
    on_depth: Callable[[int], None] | None = None,
    max_latency_factor: float | None = AdmissionConfig.max_latency_factor,
    workers: int = 1,
    device: str = "cpu",
    feature_filter: FeatureFilter = identity_filter,
    example_log: ExampleLogConfig | ExampleLog | None = None,
    coalesce_max_examples: int = DEFAULT_COALESCE_EXAMPLES,
    torch_threads: int | None = DEFAULT_TORCH_THREADS,
    control_slack: int = 0,
) -> tuple[grpc.aio.Server, int]:
    """Load the package, bind ``host:port`` (0 = any free port), start; returns (server, port).

    ``max_in_flight`` bounds the admitted requests, ``max_latency_factor`` the estimated
    latency of an admitted request against the idle one (serving/engine/admission.py);
    ``adaptive_door``: the requests worked on at once follow the knee of the throughput, up to
    ``max_in_flight``, and a quarter as many (at most ``max_queued``) wait (serving/engine/door.py,
    as the Routers' doors); ``on_depth(calls)`` hears each change of the depth; ``workers``
    threads score; concurrent requests are scored together up to ``coalesce_max_examples``
    (1 = each alone). ``example_log``: log settings (or a ready log) for the served-example log; None = off.
    ``torch_threads``: torch's intra-op threads in this process (None: leave them as they are).
    ``control_slack``: calls beyond ``max_in_flight`` gRPC still takes (behind a front, which
    bounds Predict itself, so that health checks and ModelInfo are never refused)."""
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)  # process-wide; the scoring threads inherit it
    ranker = await asyncio.to_thread(
        LocalRanker.load, package, max_batch_size=max_batch_size, device=device, feature_filter=feature_filter
    )
    if isinstance(example_log, ExampleLogConfig):
        example_log = example_log_for(example_log, ranker.package.manifest)
    admission = AdmissionConfig(max_in_flight=max_in_flight, max_latency_factor=max_latency_factor)
    door = None
    if adaptive_door:
        door = Door(max_in_flight, max_queued, adaptive=True, on_depth=_door_gauge(on_depth))
        door.on_depth(door.depth())
    servicer = MonolithServicer(ranker, admission=admission, workers=workers, example_log=example_log or OFF,
                                coalesce_max_examples=coalesce_max_examples, door=door)
    # so_reuseport off: a second server on a taken port fails to bind instead of sharing it.
    # Beyond max_in_flight calls, gRPC answers RESOURCE_EXHAUSTED before the request is parsed or
    # a handler runs; grpc.aio still takes each arrival through the event loop, so at ~1,000
    # arrivals/s on one core the refusals themselves can queue (benchmarks/results/overload-pinned):
    # serve_forever's front (serving/standalone/haproxy_front.py) refuses them in native code instead.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=max_in_flight + control_slack + (max_queued if door else 0))
    add_ranker_servicer(servicer, server, servicer.observe)  # its protobuf parse timed as stage "parse"
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc's "Failed to bind": the port is taken
        raise OSError(f"cannot bind {host}:{port}: the port is in use") from e
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    for service in HEALTH_SERVICES:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


# calls beyond max_in_flight the server takes behind a front: health checks and ModelInfo
_FRONT_CONTROL_SLACK = 8


_DOOR_GAUGE = None  # prometheus_client's gauge of this process (one per process)


def _door_gauge(also: Callable[[int], None] | None) -> Callable[[int], None]:
    """``on_depth`` of the monolith's adaptive door: the gauge recserve_door_depth, then ``also``."""
    global _DOOR_GAUGE
    if _DOOR_GAUGE is None:
        from prometheus_client import Gauge

        _DOOR_GAUGE = Gauge("recserve_door_depth", "requests the server's door takes now, working and waiting "
                                                   "(adaptive: the knee of its throughput)")
    gauge = _DOOR_GAUGE

    def told(calls: int) -> None:
        gauge.set(calls)
        if also is not None:
            also(calls)

    return told


class MonolithThread(ServerThread):
    """A monolith server on its own event loop in a background thread (for sync callers)."""

    def __init__(self, package: ModelPackage | str, port: int = 0, **kwargs):
        super().__init__(lambda: create_server(package, port, **kwargs), name="recserve-monolith", grace_s=0.5)


async def serve_forever(package: ModelPackage | str, port: int = 9000, *, metrics_port: int | None = None,
                        front: str = "none", **kwargs) -> None:
    """Run a monolith until cancelled (``recserve serve --monolith``); with ``metrics_port``
    (0 = a free one), this process's Prometheus metrics (the stage histograms of
    serving/engine/stages.py) on 127.0.0.1. ``front="haproxy"``: HAProxy answers ``port`` and
    refuses beyond ``max_in_flight`` calls in native code (serving/standalone/haproxy_front.py);
    this server then listens on a loopback port of its own."""
    host = kwargs.pop("host", "127.0.0.1")
    control_dir = None  # the front's control socket's directory (adaptive door behind the front)
    if front == "none":
        server, bound = await create_server(package, port, host=host, **kwargs)
        stop_front = None
    elif front == "haproxy":
        from serving.ops.ports import free_port
        from serving.standalone.haproxy_front import Front

        max_in_flight = kwargs.get("max_in_flight", 16)
        control = None  # adaptive: the door tells the front its depth on this socket
        if kwargs.get("adaptive_door"):
            from serving.ops.front_control import depth_teller

            control_dir = tempfile.TemporaryDirectory(prefix="recserve-front-")
            control = os.path.join(control_dir.name, "control.sock")
            tell = depth_teller(control)  # the front not up yet hears the next change (it starts at the first)
            kwargs["on_depth"] = lambda calls: tell(0, calls)
            max_in_flight += may_wait(max_in_flight, kwargs.get("max_queued", 1))  # the door's first depth
        server, inner = await create_server(package, 0, host="127.0.0.1", control_slack=_FRONT_CONTROL_SLACK,
                                            **kwargs)
        door = Front(host, port or free_port(host), f"127.0.0.1:{inner}", max_in_flight=max_in_flight,
                     checked=control is not None, stats_socket=control)
        try:
            await asyncio.to_thread(door.start)
        except BaseException:
            await server.stop(grace=None)
            if control_dir is not None:
                control_dir.cleanup()
            raise
        bound, stop_front = door.port, door.stop
        if control is None:
            print(f"recserve: the front (HAProxy) on {host}:{bound} refuses beyond {max_in_flight} requests in flight",
                  flush=True)
        else:
            print(f"recserve: the front (HAProxy) on {host}:{bound} refuses beyond the server's door, which adapts "
                  f"its depth to its throughput's knee, from {max_in_flight} requests", flush=True)
    else:
        raise ValueError(f"front must be 'none' or 'haproxy', not {front!r}")
    try:  # from here on, whatever ends this stops the front too (its own stop is idempotent)
        if metrics_port is not None:
            from prometheus_client import start_http_server

            http, _ = start_http_server(metrics_port, addr="127.0.0.1")
            print(f"recserve: metrics (Prometheus, recserve_stage_ms per stage) on "
                  f"http://127.0.0.1:{http.server_port}/metrics", flush=True)
        print(f"recserve monolith listening on {host}:{bound}", flush=True)
        await serve_until_signalled(server, grace_s=1.0, name="recserve monolith", before_stop=stop_front)
    finally:
        if stop_front is not None:
            stop_front()
        if control_dir is not None:
            control_dir.cleanup()
