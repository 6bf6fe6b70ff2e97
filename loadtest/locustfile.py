"""A locust user that speaks recserve's gRPC API (``recserve.v1.Ranker/Predict``).

Headless, CSV out (stops by itself after --run-time or --max-requests)::

    .venv/bin/locust -f loadtest/locustfile.py --headless -u 8 -r 8 --run-time 30s \\
        --host 127.0.0.1:9000 --workload criteo-kaggle --csv artifacts/locust/run

With the web UI (http://127.0.0.1:8089): leave out ``--headless``, ``-u``, ``-r``.

Each user replays a seeded trace of the workload (samples per request, zipf/uniform ids,
bag sizes around the pooling factor, normal dense features); the trace's tables are
capped at the rows the server reports through ``ModelInfo``, so a server started with a
row cap gets valid ids. Every call fires a locust request event with the response
length; a failed call carries its gRPC status code.

Options (also as env vars RECSERVE_WORKLOAD, RECSERVE_SEED, ...): --workload, --seed,
--trace-size, --rps-per-user (0 = closed loop: next request as soon as one answers),
--request-timeout, --max-requests, --max-seconds (when no --run-time is given).

Locust runs in its own process and never imports Ray (importing locust after Ray breaks
ssl under gevent's monkey patching); grpc is switched to gevent before any channel exists.
"""

from __future__ import annotations

import os
import threading
import time

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import gevent  # noqa: E402
import grpc  # noqa: E402
from locust import User, constant_throughput, events, task  # noqa: E402

from loadtest.trace import Trace, cap_rows_to_served, make_trace  # noqa: E402
from recserve.v1 import ranker_pb2  # noqa: E402
from recserve.workloads import load_workload  # noqa: E402
from serving.api.wire import MODEL_INFO_METHOD, PREDICT_METHOD, timeout_metadata  # noqa: E402

DEFAULT_HOST = "127.0.0.1:9000"


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    env = os.environ.get
    parser.add_argument("--workload", default=env("RECSERVE_WORKLOAD", "criteo-kaggle"), help="recserve workload")
    parser.add_argument("--seed", type=int, default=int(env("RECSERVE_SEED", "0")), help="trace seed")
    parser.add_argument("--trace-size", type=int, default=int(env("RECSERVE_TRACE_SIZE", "500")))
    parser.add_argument(
        "--rps-per-user", type=float, default=float(env("RECSERVE_RPS_PER_USER", "0")),
        help="requests/s per user (0: closed loop)",
    )  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=float(env("RECSERVE_TIMEOUT", "5")))
    parser.add_argument("--max-requests", type=int, default=int(env("RECSERVE_MAX_REQUESTS", "100000")))
    parser.add_argument("--max-seconds", type=float, default=float(env("RECSERVE_MAX_SECONDS", "600")))


def _target(host: str | None) -> str:
    """``127.0.0.1:9000`` from locust's --host (a scheme like grpc:// or http:// is dropped)."""
    host = (host or DEFAULT_HOST).split("://", 1)[-1].rstrip("/")
    return host or DEFAULT_HOST


_trace_lock = threading.Lock()
_trace: Trace | None = None
_sent = 0


def _shared_trace(address: str, options) -> Trace:
    """One trace per locust process, capped at the served model's rows."""
    global _trace
    with _trace_lock:
        if _trace is None:
            workload = load_workload(options.workload)
            with grpc.insecure_channel(address) as ch:
                info = ch.unary_unary(
                    MODEL_INFO_METHOD,
                    request_serializer=ranker_pb2.ModelInfoRequest.SerializeToString,
                    response_deserializer=ranker_pb2.ModelInfoResponse.FromString,
                )(ranker_pb2.ModelInfoRequest(), timeout=30)
            workload = cap_rows_to_served(workload, info)
            _trace = make_trace(workload, options.trace_size, seed=options.seed)
        return _trace


@events.test_start.add_listener
def _bound_the_run(environment, **_kw) -> None:
    """Without --run-time, stop after --max-seconds anyway: a load test always ends."""
    opts = environment.parsed_options
    if opts is not None and not getattr(opts, "run_time", None) and opts.max_seconds > 0:
        gevent.spawn_later(opts.max_seconds, environment.runner.quit)


@events.quitting.add_listener
def _final_csv_write(environment, **_kw) -> None:
    """Let locust's CSV writer run once more, so --csv holds the final counts.

    Locust rewrites the CSV files every CSV_STATS_INTERVAL_SEC and closes them on exit
    without a last write; the run's final second would otherwise be missing.
    """
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        import locust.stats

        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


class RankerUser(User):
    """Sends trace requests to Ranker.Predict; one gRPC channel per user."""

    host = DEFAULT_HOST

    def wait_time(self) -> float:
        rps = self.environment.parsed_options.rps_per_user if self.environment.parsed_options else 0
        return constant_throughput(rps)(self) if rps > 0 else 0.0

    def on_start(self) -> None:
        self.address = _target(self.host)
        self.options = self.environment.parsed_options
        self.trace = _shared_trace(self.address, self.options)
        self.channel = grpc.insecure_channel(
            self.address,
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.call = self.channel.unary_unary(PREDICT_METHOD)  # bytes in, bytes out
        self.timeout = self.options.request_timeout
        self.metadata = (timeout_metadata(self.timeout),)

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def predict(self) -> None:
        global _sent
        if _sent >= self.options.max_requests:
            gevent.spawn(self.environment.runner.quit)
            gevent.sleep(1)
            return
        payload = self.trace.payloads[_sent % len(self.trace)]
        _sent += 1
        start = time.perf_counter()
        length, exc = 0, None
        try:
            length = len(self.call(payload, timeout=self.timeout, metadata=self.metadata))
        except grpc.RpcError as e:
            exc = RuntimeError(f"{e.code().name}: {e.details()}")
        self.environment.events.request.fire(
            request_type="grpc",
            name="Predict",
            response_time=(time.perf_counter() - start) * 1000.0,  # ms
            response_length=length,  # bytes
            exception=exc,
            context={"trace_request": (_sent - 1) % len(self.trace)},
        )
