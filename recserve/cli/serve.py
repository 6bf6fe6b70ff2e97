"""``recserve serve``: start a local Ray instance, deploy the app, serve until Ctrl-C/SIGTERM.

Light module: argparse only at import time (the CLI imports every area's commands).
"""

from __future__ import annotations

import argparse

from recserve.cli.types import Subcommand
from serving.app.versions import ROUTER_APP
from serving.ops.ingress import DEFAULT_INGRESS, INGRESS_MODES

# Serve gives its proxy 5 s to start (and 10 s per health check) before its controller kills
# it, and serve.start then fails (ActorDiedError, "killed by ray.kill"): a busy 2-core machine
# misses that (seen in CI). Set before Ray starts: its processes inherit the environment.
SERVE_STARTUP_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


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
            "--" + name.replace("_", "-"), dest=name, type=_or_none(kind, none_word) if optional else kind,
            default=default, choices=choices,
            help=f"{field.description} (default {shown})".replace("%", "%%"),
        )


def _or_none(kind: type, none_word: str):
    """argparse type of an optional field: ``none_word`` (or '') stays a word, anything else is ``kind``."""
    def parse(value: str):
        return value if value in ("", none_word) else kind(value)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def app_args_from(args: argparse.Namespace, *, package: str, none_word: str = "none"):
    """The AppArgs of flags added by :func:`add_app_flags` (``none_word`` or '' -> None)."""
    from serving.config import AppArgs

    values = {}
    for name, _, _, _, optional in _flag_fields():
        value = getattr(args, name)
        values[name] = None if optional and value in ("", none_word) else value
    return AppArgs(package=package, **values)


class Serve(Subcommand):
    name = "serve"
    help = "serve a model package over gRPC on a local Ray Serve instance"
    description = ("Check the ports, start local Ray (127.0.0.1), deploy the sharded app "
                   "(router, one deployment per shard, dense tower) and serve until Ctrl-C or SIGTERM. "
                   "With no PACKAGE it serves the default model (criteo-kaggle, tables capped at 100k rows) from "
                   "artifacts/default, which `recserve default-package` builds (serving never trains). "
                   "Everything binds 127.0.0.1: Ray, Serve's gRPC proxy and the replicas' servers "
                   "(serving/ops/loopback.py).")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("package", nargs="?", default="default", help="model package directory (default: the default model)")
        p.add_argument("--port", type=int, default=9000,
                       help="gRPC port (default 9000; 0 = any free one); must be free: a taken one is refused "
                            "before anything starts")
        p.add_argument("--dashboard-port", type=int, default=8265,
                       help="Ray dashboard port on 127.0.0.1 (default 8265; a free one if it is taken)")
        p.add_argument("--http-port", type=int, default=8000,
                       help="Serve HTTP proxy port on 127.0.0.1 (default 8000; a free one if it is taken)")
        add_app_flags(p, defaults={"feature_filter": FADING_FILTER}, none_word="none")
        p.add_argument("--ingress", choices=INGRESS_MODES, default=DEFAULT_INGRESS,
                       help="who answers --port: 'direct' = the Router replica itself (Serve's direct ingress, "
                            "one Router replica), 'proxy' = Serve's gRPC proxy in front of any number of them "
                            f"(default {DEFAULT_INGRESS}; serving/ops/ingress.py)")
        p.add_argument("--monolith", action="store_true",
                       help="serve the whole model in this process (plain grpc.aio, no Ray) on 127.0.0.1")
        p.add_argument("--metrics-port", type=int, default=0,
                       help="with --monolith: Prometheus metrics (recserve_stage_ms per stage) on 127.0.0.1:PORT "
                            "(default 0 = a free one, printed; -1 = none). The Ray stack's are Ray's exporter's, "
                            "printed at start")

    def run(self, args: argparse.Namespace) -> int:
        return run_serve(args)


class Scale(Subcommand):
    name = "scale"
    help = "set the replica count of one deployment of a running `recserve serve`"
    description = ("Set the replica count of one deployment (shard-K, DenseTower or Router) of the "
                   "stack a running `recserve serve` started, through the Ray dashboard's Serve API; only that "
                   "deployment changes (the others keep their replica processes). Waits until the new count runs.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("deployment", help="deployment name: shard-K, DenseTower or Router")
        p.add_argument("replicas", type=int, help="replica count (>= 1)")
        p.add_argument("--dashboard", default=None, metavar="URL",
                       help="the Ray dashboard of the stack (default: the one the running `recserve serve` printed)")
        p.add_argument("--app", default=ROUTER_APP, help=f"Serve application (default {ROUTER_APP})")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the replicas (default 300)")

    def run(self, args: argparse.Namespace) -> int:
        return run_scale(args)


class TlsFront(Subcommand):
    name = "tls-front"
    help = "a TLS front for the gRPC port, for when it must face a network"
    description = ("Forward gRPC calls arriving over TLS on --listen to the plain port on loopback "
                   "(serving/standalone/tls_front.py); with --client-ca, callers must present a certificate it signed.")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--listen", required=True, metavar="HOST:PORT", help="address to serve TLS on, e.g. 0.0.0.0:9443")
        p.add_argument("--upstream", default="127.0.0.1:9000", metavar="HOST:PORT",
                       help="the plain gRPC port (default 127.0.0.1:9000)")
        p.add_argument("--cert", required=True, help="server certificate chain (PEM)")
        p.add_argument("--key", required=True, help="server private key (PEM)")
        p.add_argument("--client-ca", default=None, help="CA (PEM) that signs client certificates: mutual TLS")

    def run(self, args: argparse.Namespace) -> int:
        from serving.standalone.tls_front import run

        return run(args)


COMMANDS = (Serve, Scale, TlsFront)


def run_serve(args: argparse.Namespace) -> int:
    """Check the settings and the ports, prepare the package, then serve it until a signal:
    in this process (``--monolith``) or on a local Ray Serve instance."""
    import sys

    from pydantic import ValidationError

    from recserve.package import ModelPackage, PackageError
    from recserve.default_package import resolve_package
    from serving.ops.ports import PortTaken, ServePorts

    try:
        app_args = app_args_from(args, package=args.package)
    except ValidationError as e:
        for err in e.errors():
            where = f"--{str(err['loc'][0]).replace('_', '-')}: " if err["loc"] else ""
            print(f"recserve serve: {where}{err['msg']}", file=sys.stderr)
        return 2
    from serving.ops.ingress import check_ingress

    problem = None if args.monolith else check_ingress(args.ingress, app_args.router_replicas)
    if problem:
        print(f"recserve serve: {problem}", file=sys.stderr)
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
        return _serve_monolith(app_args, manifest, ports, metrics_port=args.metrics_port)
    return _serve_on_ray(app_args, manifest, ports, ingress=args.ingress)


def _serve_monolith(app_args, manifest, ports, *, metrics_port: int) -> int:
    """The whole model in this process behind grpc.aio on 127.0.0.1 (stops on SIGINT/SIGTERM)."""
    import asyncio

    from serving.engine.routing import load_feature_filter
    from serving.example_log import config_of
    from serving.standalone.monolith import serve_forever

    try:
        asyncio.run(serve_forever(app_args.package, ports.grpc, max_batch_size=app_args.max_batch_size,
                                  max_in_flight=app_args.max_in_flight,
                                  max_latency_factor=app_args.max_latency_factor, device=app_args.device,
                                  feature_filter=load_feature_filter(app_args.feature_filter, manifest),
                                  example_log=config_of(app_args),
                                  coalesce_max_examples=app_args.coalesce_max_examples,
                                  torch_threads=app_args.torch_threads,
                                  metrics_port=None if metrics_port < 0 else metrics_port))
    except KeyboardInterrupt:  # while loading, before the stop handlers are installed
        pass
    return 0


def _serve_on_ray(app_args, manifest, ports, *, ingress: str = "proxy") -> int:
    """Local Ray + Serve, the app deployed (progress while replicas start), served until
    SIGINT/SIGTERM; then Serve and Ray shut down."""
    import os
    import signal
    import threading

    from serving.ops.loopback import HOOK, ray_on_loopback
    from serving.ops.ports import free_port

    ray_on_loopback()  # before Ray starts: its node address and servers on 127.0.0.1
    import ray
    from ray import serve

    from serving.api.wire import GRPC_SERVICERS, SERVICE_NAME
    from serving.ops.state import clear_state, write_state
    from serving.app.builder import build_app

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name, value in SERVE_STARTUP_ENV.items():
        os.environ.setdefault(name, value)
    proxy_grpc, proxy_http = ports.grpc, ports.http
    if ingress == "direct" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        from serving.ops.ingress import direct_ingress_env

        os.environ.update(direct_ingress_env(ports.grpc, ports.http))  # the Router replica on --port
        proxy_grpc, proxy_http = free_port(), free_port()  # Serve still starts its proxy: elsewhere
    # Serve's proxies bind with SO_REUSEPORT by default: a second server on the same port would
    # silently share it. Off (inherited by the proxy actors through Ray's worker environment).
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    for line in ports.describe():
        print(f"recserve: {line}", flush=True)
    print("recserve: starting Ray (127.0.0.1) ...", flush=True)
    # the hook binds Serve's gRPC proxy and the replicas' gRPC servers to 127.0.0.1 (Ray 2.60
    # binds them on every interface; serving/ops/loopback.py)
    for attempt in (1, 2):
        try:
            # a retry takes a fresh dashboard port: the first try's dashboard may still hold its own
            dashboard_port = ports.ray_dashboard_port if attempt == 1 else free_port()
            context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
                               dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                               configure_logging=False, log_to_driver=False,
                               runtime_env={"worker_process_setup_hook": HOOK})
            break
        except Exception as e:  # Ray waits a fixed 30 s for its raylet: a busy machine can miss it
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
            print("recserve: Ray's node did not register within Ray's fixed 30 s (busy machine?); "
                  "starting it once more ...", flush=True)
    dashboard = f"http://{context.dashboard_url}"
    print(f"recserve: {ports.describe_dashboard(context.dashboard_url)}; token: ~/.ray/auth_token "
          f"(docs/operations.md: Dashboard)", flush=True)
    stop = threading.Event()
    serving = threading.Event()

    def on_signal(*_) -> None:
        stop.set()
        if not serving.is_set():  # starting: interrupt whatever waits (serve.start, the deploy)
            raise KeyboardInterrupt

    # Installed once, after ray.init: Ray's driver replaces SIGTERM with a handler of its own
    # that exits the process. Until here, Ctrl-C interrupts the start-up (KeyboardInterrupt).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    deploying: list[threading.Thread] = []  # serve.run's thread, while the app starts
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": proxy_http},
            grpc_options={"port": proxy_grpc, "grpc_servicer_functions": GRPC_SERVICERS},
        )
        print(f"recserve: deploying {manifest.name} {manifest.version} from {app_args.package} "
              f"({manifest.plan.num_shards} shard(s), strategy {manifest.plan.strategy}, "
              f"transport {app_args.transport}, ingress {ingress}) ...", flush=True)
        if not _deploy_with_progress(build_app(app_args), stop, deploying):
            return 1
        node = next(n for n in ray.nodes() if n["Alive"])
        write_state(dashboard=dashboard, grpc_port=ports.grpc, ray_address=context.address_info["gcs_address"],
                    metrics=f"127.0.0.1:{node['MetricsExportPort']}", session_dir=context.address_info["session_dir"])
        print(f"recserve: metrics (Prometheus, recserve_stage_ms per stage) on "
              f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", flush=True)
        print(f"recserve: serving {SERVICE_NAME} on 127.0.0.1:{ports.grpc} (gRPC; docs/operations.md: Network exposure). "
              f"Ctrl-C to stop.", flush=True)
        print(f"recserve: try  {client_command(ports.grpc)}", flush=True)
        print(f"recserve: scale a deployment:  {_recserve()} scale shard-0 2", flush=True)
        serving.set()
        while not stop.wait(0.5):
            pass
        print("recserve: shutting down ...", flush=True)
    except KeyboardInterrupt:
        print("recserve: interrupted while starting; shutting down ...", flush=True)
    finally:
        clear_state()
        try:
            serve.shutdown()
        finally:
            # a deploy interrupted mid-way still runs serve.run in its thread: it fails once Serve
            # is gone; Ray outlives it (a thread calling into a shut-down Ray exits the process, 1)
            for thread in deploying:
                thread.join(timeout=30)
            ray.shutdown()
    print("recserve: stopped", flush=True)
    return 0


def _deploy_with_progress(app, stop, threads: list, *, every_s: float = 2.0) -> bool:
    """``serve.run`` in a thread (appended to ``threads``); meanwhile, each change of the
    replicas' states is printed (which deployments are up). False if the deploy failed or a
    stop signal came first."""
    import threading

    from ray import serve
    from ray.serve.schema import LoggingConfig

    failed: list[BaseException] = []

    def deploy() -> None:
        try:
            # external_scaler_enabled: `recserve scale` sets one deployment's replica count
            # through the dashboard's REST API; the others are left as they are.
            # No access log: one line per request is noise on a terminal (errors still log).
            serve.run(app, name=ROUTER_APP, blocking=False, external_scaler_enabled=True,
                      logging_config=LoggingConfig(enable_access_log=False))
        except BaseException as e:  # noqa: BLE001  reported below
            failed.append(e)

    worker = threading.Thread(target=deploy, name="recserve-deploy", daemon=True)
    threads.append(worker)
    worker.start()
    last = None
    while worker.is_alive() and not stop.is_set():
        worker.join(every_s)
        line = describe_replicas()
        if line and line != last:
            print(f"recserve: replicas  {line}", flush=True)
            last = line
    if failed:
        print(f"recserve: deploy failed: {failed[0]}", flush=True)
        return False
    return not stop.is_set()


def describe_replicas(app: str = ROUTER_APP) -> str:
    """'shard-0 1/1 up, shard-1 0/1 up (STARTING 1), ...' from serve.status()."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return ""
    parts = []
    for name, d in status.deployments.items():
        states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
        running = states.pop("RUNNING", 0)
        others = ", ".join(f"{k} {v}" for k, v in sorted(states.items()) if v)
        parts.append(f"{name} {running}/{running + sum(states.values())} up" + (f" ({others})" if others else ""))
    return "; ".join(parts)


def _python() -> str:
    """This interpreter as a user would type it: relative to the working directory if inside it."""
    import os
    import sys

    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


def _recserve() -> str:
    return f"{_python()} -m recserve.cli"


def client_command(port: int) -> str:
    """A shell command that asks the server on ``port`` which model it serves (works as printed:
    this interpreter has grpcio; the repository root is the working directory)."""
    return (f'{_python()} -c "from serving.api.client import RankingClient; '
            f"print(RankingClient('127.0.0.1:{port}').model_info())\"")


def run_scale(args: argparse.Namespace) -> int:
    """POST the new replica count to the dashboard's Serve API, then wait until it runs."""
    import json
    import sys

    from serving.ops.scaling import ScaleError, scale_deployment
    from serving.ops.state import state_path

    dashboard = args.dashboard
    if dashboard is None:
        try:
            dashboard = json.loads(state_path().read_text())["dashboard"]
        except (OSError, ValueError, KeyError):
            print(f"recserve scale: no running `recserve serve` found ({state_path()} is missing); "
                  f"name its dashboard with --dashboard http://127.0.0.1:PORT", file=sys.stderr)
            return 2
    try:
        scale_deployment(dashboard, args.deployment, args.replicas, app=args.app, timeout_s=args.timeout,
                         progress=lambda line: print(f"recserve scale: {line}", flush=True))
    except ScaleError as e:
        print(f"recserve scale: {e}", file=sys.stderr)
        return 1
    return 0
