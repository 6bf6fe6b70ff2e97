"""``recserve serve --address``: deploy on an existing Ray cluster of several hosts.

The cluster is the operator's: recserve connects as a driver (Ray's token auth applies as for
any driver: RAY_AUTH_MODE=token and the cluster's token), deploys its app, and on exit deletes
that app and disconnects, leaving Ray and Serve running. Nothing is rebound to loopback: the
replicas of different hosts reach each other on their nodes' addresses (docs/multinode.md lists
the ports).
"""

from __future__ import annotations


def join_cluster(address: str):
    """Connect this process to the Ray cluster at ``address`` (its GCS, HOST:PORT); the
    ``ray.init`` context."""
    import ray

    print(f"recserve: joining the Ray cluster at {address} ...", flush=True)
    context = ray.init(address=address, configure_logging=False, log_to_driver=False)
    from serving.app.nodes import cluster_hosts

    hosts = cluster_hosts()
    print(f"recserve: {len(ray.nodes())} node(s); hosts (recserve-host label, Ray memory for shards): "
          + (", ".join(f"{h} {m:,} B" for h, m in hosts.items()) or "none"), flush=True)
    return context


def grpc_host(address: str | None) -> str:
    """The host callers dial: loopback for a local Ray, the cluster head's otherwise."""
    return "127.0.0.1" if address is None else address.rsplit(":", 1)[0]
