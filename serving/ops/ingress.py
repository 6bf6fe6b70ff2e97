"""Which process answers ``recserve serve``'s gRPC port.

    "shared"  every Router replica serves gRPC itself on ``--port``, the port shared
              (SO_REUSEPORT): the kernel spreads callers' connections over the replicas
              (serving/app/grpc_ingress.py). Any number of Router replicas behind one address,
              no proxy, and a door in gRPC's core (RESOURCE_EXHAUSTED before any parsing).
              Serve's own gRPC servers stay off, and so do its proxy, its HTTP and the
              replicas' direct-ingress servers (``recserve serve`` sets
              ``RAY_SERVE_ENABLE_DIRECT_INGRESS=0`` and ``proxy_location="Disabled"``). The default.
    "direct"  the Router replica serves gRPC through Serve's direct ingress (Serve hands each
              ingress replica the lowest free port of a range, which starts here at ``--port``:
              the Router, deployed first, gets it). One Router replica.
    "proxy"   Serve's per-node gRPC proxy on ``--port`` parses each request and passes it
              to a Router replica (any number of them).

All three run Serve with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` but the proxy (user code on the
replica's own loop, no thread hop; gRPC between deployments on the handle path). Measured on 2
cores (criteo-kaggle capped at 100k rows, load-2, README "Load tests"): direct ingress cut the
stack's CPU per request by the proxy's share (~6 ms of ~40 at 10 req/s).
Read from Ray 2.60's source (ray/serve/_private/constants.py, node_port_manager.py): the range
is [MIN, MAX) and a freed port is quarantined for ``RAY_SERVE_PORT_QUARANTINE_S`` (for
HAProxy's sake; 0 here, so a restarted Router replica gets the port back at once).
"""

from __future__ import annotations

from typing import Literal

Ingress = Literal["shared", "direct", "proxy"]
INGRESS_MODES: tuple[str, ...] = ("shared", "direct", "proxy")
DEFAULT_INGRESS: Ingress = "shared"


INGRESS_PORTS = 16  # ports of the range: the Router's, then one per version app's front


def direct_ingress_env(grpc_port: int, http_port: int) -> dict[str, str]:
    """Environment (set before ``ray.init``: the controller and replicas read it at import)
    under which the Router replica serves gRPC on ``grpc_port`` and HTTP on ``http_port``."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + INGRESS_PORTS),  # exclusive
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + INGRESS_PORTS),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        # Serve holds a stopping ingress replica open 30 s by default so that an external load
        # balancer can deregister it; callers dial the Router here, so Ctrl-C took 30 s (and
        # Serve's warning). The replica still waits for the requests it has in flight.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        # throughput-optimized Serve keeps each replica's log lines in memory until 1,000 are
        # there or one is an ERROR: a replica's log file stayed empty (its start, its warnings:
        # the replica-loss benchmark found every replica log of `recserve serve` empty),
        # and a killed replica took its last lines with it. The access log is off, so a request
        # writes no line: writing each at once costs the request path nothing.
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    }


def check_ingress(ingress: str, router_replicas: int, router_max_replicas: int = 0) -> str | None:
    """Why ``ingress`` cannot serve ``router_replicas`` (up to ``router_max_replicas``) on one
    address, or None."""
    if ingress == "direct" and max(router_replicas, router_max_replicas) > 1:
        flag = (f"--router-replicas {router_replicas}" if router_replicas > 1
                else f"--router-max-replicas {router_max_replicas}")
        return (f"--ingress direct serves --port from one Router replica; {flag} "
                f"needs --ingress shared (they share the port) or proxy (Serve's proxy spreads requests over them)")
    return None
