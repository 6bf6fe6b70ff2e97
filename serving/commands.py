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


# Fading is on by default in `recserve serve` (AppArgs' own default is no filter, for callers
# of build_app): with no feature being faded it returns the batch untouched.
FADING_FILTER = "serving.fading.runtime:router_filter"


def _flag_fields():
    """(name, field, type, choices, optional) of AppArgs' scalar fields (``package`` and nested
    settings left out: the positional argument, and serve.yaml's user_config)."""
    import types
    import typing

    from pydantic import BaseModel

    from serving.config import AppArgs

    for name, field in AppArgs.model_fields.items():
        kind, optional = field.annotation, False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            options = [a for a in typing.get_args(kind) if a is not type(None)]
            optional, kind = len(options) < len(typing.get_args(kind)), options[0]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        if choices:
            kind = type(choices[0])
        if name == "package" or not isinstance(kind, type) or issubclass(kind, BaseModel):
            continue
        yield name, field, kind, choices, optional


def add_app_flags(parser: argparse.ArgumentParser, *, defaults: dict | None = None, none_word: str = "none") -> None:
    """One ``--flag`` per scalar field of :class:`serving.config.AppArgs`, the one source of the
    serving settings: name, type, choices, default and help come from the model. ``defaults``
    overrides a field's default for this command; for an optional field, ``none_word`` on the
    command line means None."""
    defaults = defaults or {}
    for name, field, kind, choices, optional in _flag_fields():
        default = defaults.get(name, field.default)
        shown = f"{default}" + (f"; '{none_word}' for none" if optional else "")
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, default=default, choices=choices,
            help=f"{field.description} (default {shown})".replace("%", "%%"),
        )


def app_args_from(args: argparse.Namespace, *, package: str, none_word: str = "none"):
    """The AppArgs of flags added by :func:`add_app_flags` (``none_word`` or '' -> None)."""
    from serving.config import AppArgs

    values = {}
    for name, _, _, _, optional in _flag_fields():
        value = getattr(args, name)
        values[name] = None if optional and value in ("", none_word) else value
    return AppArgs(package=package, **values)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model package over gRPC on a local Ray Serve instance",
        description="Check the ports, start local Ray (127.0.0.1), deploy the sharded app "
        "(router, one deployment per shard, dense tower) and serve until Ctrl-C or SIGTERM. "
        "With no PACKAGE it serves the default model (criteo-kaggle, tables capped at 100k rows) from "
        "artifacts/default, which `recserve default-package` builds (serving never trains). "
        "Ray's gRPC proxy listens on all interfaces.",
    )
    p.add_argument("package", nargs="?", default="default", help="model package directory (default: the default model)")
    p.add_argument("--port", type=int, default=9000,
                   help="gRPC port (default 9000; 0 = any free one); must be free: a taken one is refused "
                        "before anything starts")
    p.add_argument("--dashboard-port", type=int, default=8265,
                   help="Ray dashboard port on 127.0.0.1 (default 8265; a free one if it is taken)")
    p.add_argument("--http-port", type=int, default=8000,
                   help="Serve HTTP proxy port on 127.0.0.1 (default 8000; a free one if it is taken)")
    add_app_flags(p, defaults={"feature_filter": FADING_FILTER}, none_word="none")
    p.add_argument("--monolith", action="store_true",
                   help="serve the whole model in this process (plain grpc.aio, no Ray) on 127.0.0.1")
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """Check the settings and the ports, prepare the package, then serve it until a signal:
    in this process (``--monolith``) or on a local Ray Serve instance."""
    import sys

    from pydantic import ValidationError

    from recserve.package import ModelPackage, PackageError
    from serving.default_model import resolve_package
    from serving.ports import PortTaken, ServePorts

    try:
        app_args = app_args_from(args, package=args.package)
    except ValidationError as e:
        for err in e.errors():
            where = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
            print(f"recserve serve: {where}{err['msg']}", file=sys.stderr)
        return 2
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
    app_args = app_args.model_copy(update={"package": str(path)})
    if args.monolith:
        return _serve_monolith(app_args, manifest, ports)
    return _serve_on_ray(app_args, manifest, ports)


def _serve_monolith(app_args, manifest, ports) -> int:
    """The whole model in this process behind grpc.aio on 127.0.0.1 (stops on SIGINT/SIGTERM)."""
    import asyncio

    from serving.api import load_feature_filter
    from serving.example_log import config_of
    from serving.monolith import serve_forever

    try:
        asyncio.run(serve_forever(app_args.package, ports.grpc, max_batch_size=app_args.max_batch_size,
                                  device=app_args.device,
                                  feature_filter=load_feature_filter(app_args.feature_filter, manifest),
                                  example_log=config_of(app_args)))
    except KeyboardInterrupt:  # while loading, before the stop handlers are installed
        pass
    return 0


def _serve_on_ray(app_args, manifest, ports) -> int:
    """Local Ray + Serve, the app deployed, served until SIGINT/SIGTERM; then Serve and Ray
    shut down."""
    import os
    import signal
    import threading

    import ray
    from ray import serve

    from serving.api import SERVICE_NAME
    from serving.app import build_app

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    # Serve's proxies bind with SO_REUSEPORT by default: a second server on the same port would
    # silently share it. Off (inherited by the proxy actors through Ray's worker environment).
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    for line in ports.describe():
        print(f"recserve: {line}", flush=True)
    print("recserve: starting Ray (127.0.0.1) ...", flush=True)
    context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
                       dashboard_host="127.0.0.1", dashboard_port=ports.ray_dashboard_port,
                       configure_logging=False, log_to_driver=False)
    print(f"recserve: {ports.describe_dashboard(context.dashboard_url)}", flush=True)
    stop = threading.Event()
    # Installed once, after ray.init: Ray's driver replaces SIGTERM with a handler of its own
    # that exits the process. Until here, Ctrl-C interrupts the start-up (KeyboardInterrupt).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": ports.http},
            grpc_options={"port": ports.grpc, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        print(f"recserve: deploying {manifest.name} {manifest.version} from {app_args.package} "
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
