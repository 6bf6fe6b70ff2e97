"""Attach a driver (``recserve deploy``) to the Ray of a running ``recserve serve`` started
from another shell, or fail within seconds naming the address it tried; never hang.

``recserve serve`` runs Ray on 127.0.0.1 with Ray's single-machine mode on
(serving/ops/loopback.py). A driver without that mode rewrites the recorded
``127.0.0.1:PORT`` GCS address to the machine's own address, where the loopback-only GCS
does not listen, and ``ray.init`` then retries for minutes. So, before ``ray.init``: the
same loopback environment, Ray's token authentication (Ray 2.60 turns it on for the local
cluster ``recserve serve`` starts; a driver without it is refused after 30 s of retries),
a TCP check of the GCS address (refused: fail now), and a watchdog for a GCS that accepts
connections but never answers.
"""

from __future__ import annotations

import socket
import sys
import threading


class AttachError(RuntimeError):
    """The running stack cannot be reached; the message names the address tried."""


def stack_address(explicit: str | None = None) -> str:
    """``explicit``, else the GCS address the running ``recserve serve`` recorded in its
    state file (serving/ops/state.py); StackNotFound (the file named) when there is neither.
    Never Ray's "auto" (the Ray last started on this machine may be anyone's)."""
    if explicit:
        return explicit
    from serving.ops.state import StackNotFound, read_state

    state = read_state()
    address = state.get("ray_address")
    if not address:
        raise StackNotFound("the running `recserve serve`'s state file records no Ray address")
    return address


def check_reachable(address: str, *, timeout_s: float = 3.0) -> None:
    """AttachError unless something accepts a TCP connection at ``address`` (host:port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise AttachError(f"{address!r}: not a Ray GCS address (HOST:PORT)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise AttachError(f"no Ray GCS answers at {address} ({e}); is `recserve serve` running?") from None


def attach(address: str, *, timeout_s: float = 60.0, who: str = "recserve", **init_args) -> None:
    """``ray.init`` connected to the stack at ``address`` (loopback mode first; ``init_args``
    go to ``ray.init``, a job's ``runtime_env`` say). A GCS that is reachable but does not
    complete the connection within ``timeout_s`` ends the process (exit status 3) with a
    message naming the address: ``ray.init`` cannot be interrupted."""
    from serving.ops.loopback import no_ray_auto_init, ray_on_loopback

    import os

    check_reachable(address)
    ray_on_loopback()  # before ray.init: keep 127.0.0.1 as 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # read when Ray is imported: the token in ~/.ray/auth_token
    no_ray_auto_init()  # (imports Ray)
    import ray

    connected = threading.Event()

    def give_up() -> None:
        if not connected.is_set():
            print(f"{who}: could not attach to the Ray GCS at {address} within {timeout_s:.0f} s; giving up",
                  file=sys.stderr, flush=True)
            os._exit(3)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        host = address.rpartition(":")[0].strip("[]")
        ray.init(address=address, _node_ip_address=host if host in ("127.0.0.1", "::1") else None,
                 log_to_driver=False, configure_logging=False, **init_args)
    except (ConnectionError, RuntimeError) as e:  # refused (the token), or a GCS that is not Ray's
        cause = e.__cause__ or e.__context__ or e
        last = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
        raise AttachError(f"could not attach to the Ray GCS at {address}: {last}") from None
    finally:
        connected.set()
        watchdog.cancel()
