"""The direct data plane in the Serve app (``AppArgs.transport == "direct"``, the default):
shard and tower replicas answer frames (serving/engine/channel.py) on a port of their node, and
the router calls them there instead of through Serve handles.

Serve still runs everything else: it starts, places, scales, health-checks and replaces the
replicas, and the handle path stays as the fallback (a replica not registered yet, or every
replica of a deployment unreachable: the request goes through Serve, whose dead-replica
handling answers it).

Where the replicas are: each registers a key in Ray's GCS key-value store when it starts and
deletes it when Serve stops it::

    dataplane/<app>/<deployment>/<model version, URL-quoted>/<replica id>@<host>:<port>

A caller picks only replicas of its own model version: while Serve updates an application in
place to a new package (``serve deploy`` of an edited deploy/serve.yaml), old and new replicas
run side by side under the same deployment names, and a batch must never be looked up by one
version and scored by another.

The caller lists its app's keys (one GCS call) at most every ``refresh_s`` and in the
background; a replica that refuses or drops its connection is left out until a listing
without it or ``retry_after_s``. The key of a replica that was killed stays until the router
finds its port closed and deletes it.
"""

from __future__ import annotations

import asyncio
import random
import time
from urllib.parse import quote, unquote

import ray

from serving.engine.channel import Channel, ChannelBroken, ChannelServer, Handler

_KV_NAMESPACE = "recserve"


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


class NoReplica(ConnectionError):
    """No replica of a deployment can be reached on the data plane (none registered yet, or all
    refused): the caller sends the call through Serve instead."""


def _prefix(app: str, deployment: str = "") -> bytes:
    return f"dataplane/{app}/{deployment}".encode()


Endpoint = tuple[str, str, int, str]  # (replica id, host, port, model version)


def _key(app: str, deployment: str, endpoint: Endpoint) -> bytes:
    replica, host, port, version = endpoint
    return _prefix(app, deployment) + f"/{quote(version, safe='')}/{replica}@{host}:{port}".encode()


def list_endpoints(app: str) -> dict[str, list[Endpoint]]:
    """deployment -> [(replica id, host, port, model version)] of ``app``'s registered replicas."""
    from ray.experimental import internal_kv

    out: dict[str, list[Endpoint]] = {}
    for key in internal_kv._internal_kv_list(_prefix(app), namespace=_KV_NAMESPACE):
        deployment, _, rest = key.decode()[len(_prefix(app)):].partition("/")
        version, _, rest = rest.partition("/")
        replica, _, address = rest.rpartition("@")
        host, _, port = address.rpartition(":")
        if not (replica and host and port.isdigit()):  # a key of another layout: not ours to read
            continue
        out.setdefault(deployment, []).append((replica, host, int(port), unquote(version)))
    return out


def _forget(app: str, deployment: str, endpoint: Endpoint) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(app, deployment, endpoint), namespace=_KV_NAMESPACE)


class ReplicaEndpoint:
    """A shard's or the tower's end: serves ``handlers`` on its node's address and registers it.
    Made in the replica's constructor (Serve runs it on the replica's event loop, where the
    calls then run beside the handle path's: both meet in the replica's batcher)."""

    def __init__(self, handlers: dict[str, Handler], *, version: str):
        from ray import serve

        replica_id = serve.get_replica_context().replica_id
        self.app, self.deployment = replica_id.deployment_id.app_name, replica_id.deployment_id.name
        self.replica, self.version = replica_id.unique_id, version
        self.server = ChannelServer(handlers, ray.util.get_node_ip_address())
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_task(self.server.start())  # listening already
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(_key(self.app, self.deployment, self._endpoint()), b"", overwrite=True,
                                     namespace=_KV_NAMESPACE)

    def _endpoint(self) -> Endpoint:
        return self.replica, self.server.host, self.server.port, self.version

    def close(self) -> None:
        """Unregister, then drop the connections (callers in flight retry on other replicas or
        through Serve)."""
        try:
            _forget(self.app, self.deployment, self._endpoint())
        except Exception:  # noqa: BLE001  Ray is shutting down: the key goes with the cluster
            pass
        try:
            in_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            in_loop = False
        try:
            if in_loop:
                self.server.close()
            else:  # Serve may run the destructor on another thread: the server belongs to its loop
                self._loop.call_soon_threadsafe(self.server.close)
        except RuntimeError:  # the loop is closed: the process is ending, its sockets with it
            pass


class DirectPlane:
    """The router's (or any caller's) side: one :class:`Channel` per replica, the replica with
    fewer calls in flight of two drawn at random (all of them when there are few), among the
    replicas of the caller's model version."""

    def __init__(self, *, refresh_s: float = 1.0, retry_after_s: float = 5.0):
        self.refresh_s, self.retry_after_s = refresh_s, retry_after_s
        self._endpoints: dict[str, tuple[float, dict[str, list[Endpoint]]]] = {}
        self._listing: dict[str, asyncio.Future] = {}
        self._channels: dict[tuple[str, int], Channel] = {}
        self._refused: dict[tuple[str, int], float] = {}  # address -> until when it is left out

    async def call(self, app: str, deployment: str, method: str, arrays, *, version: str,
                   deadline: float | None = None) -> list:
        """``method``'s arrays from a replica of ``deployment`` serving model ``version``; raises
        what the method raised, or NoReplica when no such replica can be reached."""
        tried: set[tuple[str, int]] = set()
        while True:
            channel = await self._pick(app, deployment, version, tried)
            try:
                return await channel.call(method, arrays, deadline=deadline)
            except ChannelBroken:
                address = (channel.host, channel.port)
                tried.add(address)
                self._drop(app, deployment, address)

    async def _pick(self, app: str, deployment: str, version: str, tried: set) -> Channel:
        endpoints = [e for e in (await self._listed(app)).get(deployment, ()) if e[3] == version]
        now = time.monotonic()
        usable = [(h, p) for _, h, p, _ in endpoints if (h, p) not in tried and self._refused.get((h, p), 0) <= now]
        if not usable:
            raise NoReplica(f"{app}/{deployment}: no replica of version {version!r} reachable on the data plane "
                            f"({len(endpoints)} registered, {len(tried)} failed just now)")
        usable = random.sample(usable, min(2, len(usable)))  # in random order: ties go either way
        channels = [self._channel(a) for a in usable]
        return min(channels, key=lambda c: c.in_flight)

    def _channel(self, address: tuple[str, int]) -> Channel:
        channel = self._channels.get(address)
        if channel is None or channel.broken is not None:
            channel = self._channels[address] = Channel(*address)
        return channel

    def _drop(self, app: str, deployment: str, address: tuple[str, int]) -> None:
        """A replica that broke its connection or refused one: out until retry_after_s, its key
        deleted if its port is closed (a killed replica never deletes its own)."""
        self._refused[address] = time.monotonic() + self.retry_after_s
        channel = self._channels.pop(address, None)
        if channel is not None and isinstance(channel.broken, ConnectionRefusedError):
            for endpoint in self._endpoints.get(app, (0, {}))[1].get(deployment, ()):
                if endpoint[1:3] == address:
                    asyncio.ensure_future(asyncio.to_thread(_forget, app, deployment, endpoint)
                                          ).add_done_callback(_retrieved)

    async def _listed(self, app: str) -> dict[str, list[Endpoint]]:
        at, endpoints = self._endpoints.get(app, (None, {}))
        stale = at is None or time.monotonic() - at > self.refresh_s
        if stale:
            listing = self._listing.get(app)
            if listing is None or listing.done():
                listing = self._listing[app] = asyncio.ensure_future(self._list(app))
                listing.add_done_callback(_retrieved)  # a background listing's failure is no one's error
            if at is None or not endpoints:  # nothing to go on yet: wait for the listing
                return await asyncio.shield(listing)
        return endpoints

    async def _list(self, app: str) -> dict[str, list[Endpoint]]:
        try:
            endpoints = await asyncio.to_thread(list_endpoints, app)
        except Exception as e:  # noqa: BLE001  the GCS did not answer: keep what is known, or go through Serve
            at, known = self._endpoints.get(app, (None, {}))
            if not known:
                raise NoReplica(f"{app}: the data plane's replica list could not be read ({e})") from e
            self._endpoints[app] = (time.monotonic(), known)  # tried again after refresh_s
            return known
        self._endpoints[app] = (time.monotonic(), endpoints)
        registered = {(h, p) for _, known in self._endpoints.values() for eps in known.values() for _, h, p, _ in eps}
        for address in [a for a in self._refused if a not in registered]:
            self._refused.pop(address)
        for address in [a for a in self._channels if a not in registered]:  # scaled down: its key is gone
            self._channels.pop(address).close()
        return endpoints

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
