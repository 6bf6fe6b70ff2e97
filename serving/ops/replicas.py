"""Ask every running replica of a Serve app something about itself (where it runs), through
the replica actors' ``__ray_call__``. For checks and benchmarks, never on the request path."""

from __future__ import annotations

from typing import Any, Callable


def ask_replicas(app: str, probe: Callable[[], dict[str, Any]], *, timeout_s: float = 30.0,
                 skip_dead: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> ``probe()`` run in each running replica of Serve app ``app`` (found by
    its Serve actor name; needs a connected Ray driver), and of its version applications
    (``app@<version>``: where `recserve serve` runs a version's shards and tower, beside the
    router's app; serving/app/versions.py). ``skip_dead``: leave out a replica
    that died since it was listed (a lost node) instead of raising."""
    import ray

    found: dict[str, list[dict[str, Any]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        parts = name.split("::", 1)[-1].split("#")  # SERVE_REPLICA::app#deployment#id
        if not name.startswith("SERVE_REPLICA::") or len(parts) != 3 or not (parts[0] == app or parts[0].startswith(f"{app}@")):
            continue
        actor = ray.get_actor(name, namespace=entry["namespace"])
        try:
            info = ray.get(actor.__ray_call__.remote(lambda _self: probe()), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            if not skip_dead:
                raise
            continue
        found.setdefault(parts[1], []).append(info)
    return dict(sorted(found.items()))
