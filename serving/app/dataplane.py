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

A replica that stops answering without closing its connection (a host gone from the network,
a stopped process, a long pause) would hold its calls until their deadlines. So a call that
takes ``hedge_factor`` x the recent 90th percentile of its (deployment, method) -- at least
``hedge_floor_s`` -- is sent to a second replica as well, the first answer wins, and the slow
replica is passed over for ``slow_out_s`` (unless no other is left). At most ``hedge_budget``
of the calls are sent twice, so an overload that slows every call does not double it.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from urllib.parse import quote, unquote

import ray

from serving.engine.channel import Channel, ChannelBroken, ChannelServer, Handler

_KV_NAMESPACE = "recserve"


def _retrieved(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _give_up(call: asyncio.Future, *, keep: bool) -> None:
    """A call no longer awaited here: cancelled, or (``keep``) left to run to its answer."""
    if keep:
        call.add_done_callback(_retrieved)
    else:
        call.cancel()


async def _on(channel: Channel, method: str, arrays, deadline: float | None) -> list:
    """``channel.call``, its ChannelBroken naming the replica's address (a hedged call's error
    may come from either replica)."""
    try:
        return await channel.call(method, arrays, deadline=deadline)
    except ChannelBroken as e:
        e.address = (channel.host, channel.port)
        raise


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


class _Timings:
    """Recent answer times of one (app, deployment, method) and how many calls went twice."""

    MIN_SAMPLES = 32

    def __init__(self, size: int = 256):
        self.times: collections.deque[float] = collections.deque(maxlen=size)
        self.p90: float | None = None
        self.calls = self.hedged = 0

    def record(self, seconds: float) -> None:
        self.times.append(seconds)
        if len(self.times) >= self.MIN_SAMPLES and len(self.times) % 16 == 0:
            self.p90 = sorted(self.times)[int(0.9 * len(self.times))]

    def counted(self) -> None:
        self.calls += 1
        if self.calls > 10_000:  # a sliding share: the older half forgotten
            self.calls, self.hedged = self.calls // 2, self.hedged // 2


class DirectPlane:
    """The router's (or any caller's) side: one :class:`Channel` per replica, the replica with
    fewer calls in flight of two drawn at random (all of them when there are few), among the
    replicas of the caller's model version; a call a replica is slow to answer also goes to
    another (the module docstring)."""

    def __init__(self, *, refresh_s: float = 1.0, retry_after_s: float = 5.0, hedge_factor: float = 3.0,
                 hedge_floor_s: float = 0.02, hedge_budget: float = 0.05, slow_out_s: float = 1.0,
                 on_hedge: Callable[[str], None] | None = None):
        """``on_hedge(deployment)``: called for each call sent to a second replica (a metric)."""
        self.refresh_s, self.retry_after_s = refresh_s, retry_after_s
        self.on_hedge = on_hedge
        self.hedge_factor, self.hedge_floor_s, self.hedge_budget = hedge_factor, hedge_floor_s, hedge_budget
        self.slow_out_s = slow_out_s
        self._endpoints: dict[str, tuple[float, dict[str, list[Endpoint]]]] = {}
        self._listing: dict[str, asyncio.Future] = {}
        self._channels: dict[tuple[str, int], Channel] = {}
        self._refused: dict[tuple[str, int], float] = {}  # address -> until when it is left out
        self._slow: dict[tuple[str, int], float] = {}  # address -> until when it is passed over if others are there
        self._timings: dict[tuple[str, str, str], _Timings] = collections.defaultdict(_Timings)
        self.hedges = 0  # calls sent to a second replica, and ...
        self.hedges_won = 0  # ... those the second replica answered first

    async def call(self, app: str, deployment: str, method: str, arrays, *, version: str,
                   deadline: float | None = None,
                   on_resend: Callable[[asyncio.Future | None], None] | None = None) -> list:
        """``method``'s arrays from a replica of ``deployment`` serving model ``version``; raises
        what the method raised, or NoReplica when no such replica can be reached.
        ``on_resend(call)`` is called when the call goes to a second replica: the first may still
        be working on it (serving/engine/ipc.py: a ring slot it may write). Hedged, ``call`` is the
        call to the replica that lost the race, left to run to its answer (it is not cancelled
        when ``on_resend`` is given; its outcome, its answer or ChannelBroken); after a broken
        connection, None: whether that replica still works on it cannot be known."""
        tried: set[tuple[str, int]] = set()
        timings = self._timings[(app, deployment, method)]
        timings.counted()
        while True:
            channel = await self._pick(app, deployment, version, tried)
            try:
                return await self._answer(channel, timings, app, deployment, method, arrays, version, deadline, tried,
                                          on_resend)
            except ChannelBroken as e:
                address = getattr(e, "address", None) or (channel.host, channel.port)
                tried.add(address)
                self._drop(app, deployment, address)
                if on_resend is not None:
                    on_resend(None)

    async def _answer(self, channel: Channel, timings: _Timings, app: str, deployment: str, method: str, arrays,
                      version: str, deadline: float | None, tried: set,
                      on_resend: Callable[[asyncio.Future | None], None] | None = None) -> list:
        """The first answer to the call on ``channel``, or on a second replica once the first is slow."""
        started = time.monotonic()
        first = asyncio.ensure_future(_on(channel, method, arrays, deadline))
        try:
            after = None if timings.p90 is None else max(self.hedge_floor_s, self.hedge_factor * timings.p90)
            if after is not None:
                await asyncio.wait([first], timeout=after)
            if first.done() or after is None or timings.hedged >= self.hedge_budget * timings.calls:
                out = await first
                timings.record(time.monotonic() - started)
                return out
            try:
                other = await self._pick(app, deployment, version, tried | {(channel.host, channel.port)})
            except NoReplica:  # no second replica: the first answers or fails
                return await first
            timings.hedged += 1
            self.hedges += 1
            if self.on_hedge is not None:
                self.on_hedge(deployment)
            second = asyncio.ensure_future(_on(other, method, arrays, deadline))
            try:
                racing = {first, second}
                while racing:
                    done, racing = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                    for call in done:
                        if call.exception() is None or not racing:  # an answer, or the last one's error
                            if call is second:
                                self.hedges_won += 1
                                self._slow[(channel.host, channel.port)] = time.monotonic() + self.slow_out_s
                            if on_resend is not None:  # the loser runs on to its answer, for the caller
                                on_resend(second if call is first else first)
                            return call.result()
            finally:
                _give_up(second, keep=on_resend is not None)
        finally:
            _give_up(first, keep=on_resend is not None)
        raise AssertionError("unreachable")

    async def _pick(self, app: str, deployment: str, version: str, tried: set) -> Channel:
        endpoints = [e for e in (await self._listed(app)).get(deployment, ()) if e[3] == version]
        now = time.monotonic()
        usable = [(h, p) for _, h, p, _ in endpoints if (h, p) not in tried and self._refused.get((h, p), 0) <= now]
        brisk = [a for a in usable if self._slow.get(a, 0) <= now]
        if brisk:  # a replica that was slow just now only when no other is left
            usable = brisk
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
        for address in [a for a in self._slow if a not in registered]:
            self._slow.pop(address)
        for address in [a for a in self._channels if a not in registered]:  # scaled down: its key is gone
            self._channels.pop(address).close()
        return endpoints

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
