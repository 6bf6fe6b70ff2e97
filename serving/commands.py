"""``recserve serve``: start a local Ray instance, deploy the app, serve until Ctrl-C/SIGTERM.

Light module: argparse only at import time (the CLI imports every area's commands).
"""

from __future__ import annotations

import argparse

GRPC_SERVICERS = [
    "recserve.v1.ranker_pb2_grpc.add_RankerServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
APP_NAME = "recserve"


# Fading is on by default: with no feature being faded it returns the batch untouched.
FADING_FILTER = "serving.fading.runtime:router_filter"

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model package over gRPC on a local Ray Serve instance",
        description="Check the ports, start local Ray (127.0.0.1), deploy the sharded app "
        "(router, one deployment per shard, dense tower) and serve until Ctrl-C or SIGTERM. "
        "With no PACKAGE the default model (criteo-kaggle, tables capped at 100k rows) is trained "
        "and exported into artifacts/default on first run. Ray's gRPC proxy listens on all interfaces.",
    )
    p.add_argument("package", nargs="?", default="default", help="model package directory (default: the default model)")
    p.add_argument("--port", type=int, default=9000,
                   help="gRPC port (default 9000; 0 = any free one); must be free: a taken one is refused "
                        "before anything starts")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="Ray dashboard port on 127.0.0.1 (default 8265; a free one if it is taken)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="Serve HTTP proxy port on 127.0.0.1 (default 8000; a free one if it is taken)")
    p.add_argument("--transport", choices=("reference", "grpc"), default=None,
                   help="handle transport between deployments (default: the faster, see README)")
    p.add_argument("--device", default="cpu", help="torch device for shards and tower: cpu, cuda, auto")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="largest batch one request may carry (default: AppArgs' max_batch_size)")
    p.add_argument("--feature-filter", default=FADING_FILTER, metavar="MODULE:FACTORY",
                   help="feature filter applied by the router before the split: factory(manifest) -> "
                        f"callable(Batch) -> Batch (default: feature fading, {FADING_FILTER}; 'none' for no filter)")
    p.add_argument("--log-rate", type=float, default=0.0, metavar="R",
                   help="fraction of requests whose served examples are logged as Parquet (0 = off)")
    p.add_argument("--log-dir", default="", metavar="DIR",
                   help="example log directory or pyarrow filesystem URL (s3://..., gs://...)")
    p.add_argument("--monolith", action="store_true",
                   help="serve the whole model in this process (plain grpc.aio, no Ray) on 127.0.0.1")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if not 0.0 <= args.log_rate <= 1.0 or (args.log_rate > 0 and not args.log_dir):
        print("recserve serve: --log-rate must be in [0, 1] and needs --log-dir when above 0", file=__import__("sys").stderr)
        return 2
    if args.feature_filter in ("", "none"):
        args.feature_filter = None
    import os
    import signal
    import sys
    import threading

    from recserve.package import ModelPackage, PackageError
    from serving.api import SERVICE_NAME
    from serving.config import DEFAULT_MAX_BATCH_SIZE
    from serving.default_model import resolve_package
    from serving.ports import PortTaken, ServePorts

    if args.max_batch_size is None:
        args.max_batch_size = DEFAULT_MAX_BATCH_SIZE
    try:  # before any training or deploying: a taken gRPC port fails now, not after a minute
        ports = ServePorts.choose(grpc=args.port, dashboard=args.dashboard_port, http=args.http_port)
    except PortTaken as e:
        print(f"recserve serve: {e}", file=sys.stderr)
        return 2

    try:
        path = resolve_package(args.package)
        manifest = ModelPackage.open(path).manifest
    except PackageError as e:
        print(f"recserve serve: {e}", file=sys.stderr)
        return 2
    if args.monolith:
        import asyncio

        from serving.api import load_feature_filter
        from serving.monolith import serve_forever

        from serving.config import AppArgs
        from serving.example_log import config_of

        log = config_of(AppArgs(log_rate=args.log_rate, log_dir=args.log_dir))
        try:
            asyncio.run(serve_forever(path, ports.grpc, max_batch_size=args.max_batch_size, device=args.device,
                                      feature_filter=load_feature_filter(args.feature_filter, manifest),
                                      example_log=log))
        except KeyboardInterrupt:
            pass
        return 0

    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import DEFAULT_TRANSPORT, AppArgs

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    # Serve's proxies bind with SO_REUSEPORT by default: a second server on the same port would
    # silently share it. Off (inherited by the proxy actors through Ray's worker environment).
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    app_args = AppArgs(package=str(path), transport=args.transport or DEFAULT_TRANSPORT,
                       device=args.device, max_batch_size=args.max_batch_size, feature_filter=args.feature_filter,
                       log_rate=args.log_rate, log_dir=args.log_dir)
    stop = threading.Event()

    def stop_on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    stop_on_signals()
    for line in ports.describe():
        print(f"recserve: {line}", flush=True)
    print("recserve: starting Ray (127.0.0.1) ...", flush=True)
    context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=ports.ray_dashboard_port,
                       configure_logging=False, log_to_driver=False)
    print(f"recserve: {ports.describe_dashboard(context.dashboard_url)}", flush=True)
    stop_on_signals()  # again: Ray's driver installs a SIGTERM handler of its own that aborts the process
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": ports.http},
            grpc_options={"port": ports.grpc, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        print(f"recserve: deploying {manifest.name} {manifest.version} from {path} "
              f"({manifest.plan.num_shards} shard(s), strategy {manifest.plan.strategy}, "
              f"transport {app_args.transport}) ...", flush=True)
        serve.run(build_app(app_args), name=APP_NAME, blocking=False)
        print(f"recserve: serving {SERVICE_NAME} on 0.0.0.0:{ports.grpc} (gRPC; Ray's proxy binds all "
              f"interfaces; connect to 127.0.0.1:{ports.grpc}). Ctrl-C to stop.", flush=True)
        print(f'recserve: try  python -c "from serving.client import RankingClient; '
              f"print(RankingClient('127.0.0.1:{ports.grpc}').model_info())\"", flush=True)
        while not stop.wait(0.5):
            pass
        print("recserve: shutting down ...", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    print("recserve: stopped", flush=True)
    return 0
