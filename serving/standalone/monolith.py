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
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from recserve.package import ModelPackage
from recserve.v1 import ranker_pb2_grpc
from serving.engine.admission import Admission, AdmissionConfig
from serving.api.codec import check_model, decode_request, encode_response, model_info
from serving.api.errors import DeadlineExceeded
from serving.api.wire import HEALTH_SERVICES, caller_timeout_s
from serving.config import DEFAULT_MAX_BATCH_SIZE
from serving.engine.local_ranker import LocalRanker
from serving.example_log import OFF, ExampleLog, ExampleLogConfig, NoLog, example_log_for
from serving.engine.routing import REQUEST_ID, FeatureFilter, identity_filter
from serving.api.status import grpc_status
from serving.ops.server_thread import ServerThread, serve_until_signalled


class MonolithServicer(ranker_pb2_grpc.RankerServicer):
    """Thin: check the model, admit (or shed), decode, score on the worker threads, encode;
    errors leave through context.abort.

    Scoring runs on ``workers`` threads; admitted requests queue for them. Admission
    (serving/engine/admission.py) sheds with RESOURCE_EXHAUSTED before decoding when a request
    cannot be answered within its deadline (or ``max_latency_factor`` x the idle latency),
    and a request whose deadline passes while it waits for a worker is never scored."""

    def __init__(self, ranker: LocalRanker, *, admission: AdmissionConfig | None = None, workers: int = 1,
                 example_log: ExampleLog | NoLog = OFF):
        self.ranker = ranker
        self.example_log = example_log
        self.admission = Admission(admission or AdmissionConfig())
        self.workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recserve-score")

    def _score(self, batch, deadline: float | None):
        if deadline is not None and time.monotonic() >= deadline:  # waited out its deadline in the queue
            raise DeadlineExceeded("deadline expired while the request waited for a worker")
        return self.ranker.score(batch)

    def _left(self, ticket, answered: bool, work: asyncio.Future) -> None:
        if not work.cancelled():
            work.exception()  # retrieved: the caller has had its error already
        self.admission.done(ticket, answered=answered)

    async def Predict(self, request, context):
        started = time.monotonic()
        token = REQUEST_ID.set(request.request_id)  # copied into the scoring thread by contextvars
        ticket = work = None
        answered = False
        try:
            left = caller_timeout_s(context)
            check_model(self.ranker.spec, request.model, request.version)
            examples = min(int(request.batch_size), self.ranker.spec.max_batch_size)
            ticket = self.admission.admit(examples, left)  # sheds before any decoding work
            batch = decode_request(request, self.ranker.spec)
            deadline = None if left is None else started + left
            call = functools.partial(contextvars.copy_context().run, self._score, batch, deadline)
            work = asyncio.get_running_loop().run_in_executor(self.workers, call)
            if deadline is None:
                scores = await asyncio.shield(work)
            else:
                try:
                    scores = await asyncio.wait_for(asyncio.shield(work), timeout=max(deadline - time.monotonic(), 0.0))
                except TimeoutError:
                    raise DeadlineExceeded(f"deadline of {left * 1000:.0f} ms exceeded while scoring") from None
            m = self.ranker.package.manifest
            response = encode_response(scores, model=m.name, version=m.version, request_id=request.request_id)
            answered = True
        except Exception as e:  # noqa: BLE001  the edge: every error leaves with its code
            code, message = grpc_status(e)
            await context.abort(code, message)
        finally:
            REQUEST_ID.reset(token)
            if ticket is not None:
                if work is not None:  # a worker cannot be interrupted: the request is in flight until it
                    # stops; its outcome is retrieved even when the caller got its error first
                    work.add_done_callback(functools.partial(self._left, ticket, answered))
                else:
                    self.admission.done(ticket, answered=answered)
        self.example_log.submit(request.request_id, batch, scores, self.ranker.feature_filter)  # never blocks
        return response

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
    max_latency_factor: float | None = AdmissionConfig.max_latency_factor,
    workers: int = 1,
    device: str = "cpu",
    feature_filter: FeatureFilter = identity_filter,
    example_log: ExampleLogConfig | ExampleLog | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Load the package, bind ``host:port`` (0 = any free port), start; returns (server, port).

    ``max_in_flight`` bounds the admitted requests, ``max_latency_factor`` the estimated
    latency of an admitted request against the idle one (serving/engine/admission.py); ``workers``
    threads score. ``example_log``: log settings (or a ready log) for the served-example log; None = off."""
    ranker = await asyncio.to_thread(
        LocalRanker.load, package, max_batch_size=max_batch_size, device=device, feature_filter=feature_filter
    )
    if isinstance(example_log, ExampleLogConfig):
        example_log = example_log_for(example_log, ranker.package.manifest)
    admission = AdmissionConfig(max_in_flight=max_in_flight, max_latency_factor=max_latency_factor)
    servicer = MonolithServicer(ranker, admission=admission, workers=workers, example_log=example_log or OFF)
    # so_reuseport off: a second server on a taken port fails to bind instead of sharing it.
    # Beyond max_in_flight calls, gRPC's core answers RESOURCE_EXHAUSTED itself, before this
    # process parses the request: under overload the event loop never drowns in arrivals.
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.so_reuseport", 0)],
                             maximum_concurrent_rpcs=max_in_flight)
    ranker_pb2_grpc.add_RankerServicer_to_server(servicer, server)
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


class MonolithThread(ServerThread):
    """A monolith server on its own event loop in a background thread (for sync callers)."""

    def __init__(self, package: ModelPackage | str, port: int = 0, **kwargs):
        super().__init__(lambda: create_server(package, port, **kwargs), name="recserve-monolith", grace_s=0.5)


async def serve_forever(package: ModelPackage | str, port: int = 9000, **kwargs) -> None:
    """Run a monolith until cancelled (``recserve serve --monolith``)."""
    server, bound = await create_server(package, port, **kwargs)
    print(f"recserve monolith listening on {kwargs.get('host', '127.0.0.1')}:{bound}", flush=True)
    await serve_until_signalled(server, grace_s=1.0, name="recserve monolith")
