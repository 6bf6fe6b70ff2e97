"""Keep a local Ray 2.60 + Serve stack on 127.0.0.1.

Two steps, both before ``ray.init``:

- :func:`ray_on_loopback`: Ray resolves the node address "127.0.0.1" to the machine's
  address (``services.resolve_ip_for_localhost``) unless its single-machine mode is on
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the setting macOS/Windows use); with it, the
  node address is 127.0.0.1 and the GCS, raylet, core workers and agents bind loopback.
- :data:`HOOK` for ``ray.init(runtime_env={"worker_process_setup_hook": HOOK})``:
  Serve's gRPC proxy (the port callers dial: Ranker and Serve's ListApplications answer there
without credentials) and each replica's internal gRPC server (the "grpc" transport between
deployments) bind ``[::]`` with no setting to change it (ray/serve/_private/grpc_util.py,
replica.py). :func:`bind_serve_to_loopback` runs in every Ray worker of a ``recserve serve``
stack (``ray.init(runtime_env={"worker_process_setup_hook": ...})``) before any actor starts,
and rewrites those addresses to the loopback one.

tests/serving/test_serve_command.py reads the stack's listening sockets from the OS and
checks that every one is on loopback.
"""

from __future__ import annotations

import os

HOOK = "serving.ops.loopback.bind_serve_to_loopback"  # module.function, as Ray loads it
HOST_ENV = "RECSERVE_SERVE_HOST"  # the address Serve's gRPC servers bind (default 127.0.0.1)


def ray_on_loopback() -> None:
    """Ray's single-machine mode for this process and every Ray process it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray already imported: the constant is read at call time
        constants.ENABLE_RAY_CLUSTER = False


def no_ray_auto_init() -> None:
    """No second Ray in this process. Ray starts a fresh local Ray whenever one of its APIs is
    called before ``ray.init`` or after ``ray.shutdown`` (auto-init), from any thread. A process
    that starts or attaches to its Ray itself never wants that: a thread still calling Serve
    while the process shuts down (a deploy interrupted by Ctrl-C) would start a second Ray,
    and Ray then ends the process, status 1, as the first one's core worker goes. With this, that
    call raises in its own thread instead."""
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False


def _host() -> str:
    return os.environ.get(HOST_ENV, "127.0.0.1")


def rebind(address: str) -> str:
    """``[::]:P`` or ``0.0.0.0:P`` -> ``HOST:P``; anything else unchanged."""
    for wildcard in ("[::]:", "0.0.0.0:"):
        if address.startswith(wildcard):
            host = _host()
            return f"[{host}]:{address[len(wildcard):]}" if ":" in host else f"{host}:{address[len(wildcard):]}"
    return address


def bind_serve_to_loopback() -> None:
    """worker_process_setup_hook: patch Serve's two binders (Ray 2.60) in this worker."""
    from ray.serve._private import default_impl, replica

    if getattr(default_impl, "_recserve_rebound", False):
        return
    add_grpc_address = default_impl.add_grpc_address
    add_port = replica.add_port_to_grpc_server
    default_impl.add_grpc_address = lambda server, address: add_grpc_address(server, rebind(address))
    replica.add_port_to_grpc_server = lambda server, address: add_port(server, rebind(address))
    default_impl._recserve_rebound = True
