"""The direct data plane between deployments: numpy arrays in length-prefixed frames over one
TCP connection per (caller process, replica), many calls in flight on each.

Why: a Ray Serve handle call costs ~1-3 ms of Python in the caller and the callee (a streaming
actor task, a rejection handshake, request metadata, pickling); a request paid that S+1 times
(benchmarks/results/dataplane-2core: ~22 of a sharded request's 34 ms on 2 cores were Ray's
path). A frame costs a header, a JSON line and the arrays' bytes: no pickling of arrays, no
actor task. Serve still starts, places, scales and health-checks the deployments; only the
request data takes this path (serving/app/dataplane.py finds the replicas).

Frame (little-endian)::

    u64 bytes that follow | u64 call id | u32 meta bytes | meta (JSON) | array bytes, one after another

    call:   meta {"m": method, "a": [[dtype, shape] | null, ...], "d": deadline (time.time()) | null}
    reply:  meta {"a": [...]}                         the method's arrays
            meta {"e": 1} + a pickled exception       the method raised (a ServingError keeps its class)

Replies come in any order (matched by call id); a caller that gives up drops its call and the
late reply is discarded; a call's work is cancelled on the replica when the deadline it carries
passes (DeadlineExceeded). A broken connection fails every call in flight on it with
:class:`ChannelBroken` (the replica died or is stopping): the caller retries elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import pickle
import socket
import struct
import time
from typing import Awaitable, Callable, Sequence

import numpy as np

from serving.api.errors import DeadlineExceeded

_HEAD = struct.Struct("<QQI")  # bytes after this header (meta + arrays), call id, meta bytes
MAX_FRAME_BYTES = 8 << 30  # larger than any batch's arrays (dlrmv2's 4096-example pooled output: 54 MB); a
# header beyond it is not this protocol (a port scan, a stray client): the connection is dropped
Arrays = Sequence[np.ndarray | None]
Handler = Callable[[list, float | None], Awaitable[Arrays]]  # (arrays, deadline) -> arrays


class ChannelBroken(ConnectionError):
    """The connection to a replica failed (refused, reset, closed): every call in flight on it
    fails with this; nothing was answered, so the call may be sent again elsewhere."""


def _describe(arrays: Arrays) -> tuple[list, list[memoryview]]:
    specs, buffers = [], []
    for a in arrays:
        if a is None:
            specs.append(None)
            continue
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        specs.append([a.dtype.str, list(a.shape)])
        if a.size:
            buffers.append(memoryview(a.reshape(-1)).cast("B"))
    return specs, buffers


def _frame(call_id: int, meta: dict, buffers: list) -> list:
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    rest = len(meta_bytes) + sum(len(b) for b in buffers)
    return [_HEAD.pack(rest, call_id, len(meta_bytes)), meta_bytes, *buffers]


def _arrays(specs: list, body: bytearray, offset: int) -> list[np.ndarray | None]:
    """Views into ``body`` (no copy)."""
    out = []
    for spec in specs:
        if spec is None:
            out.append(None)
            continue
        dtype, shape = np.dtype(spec[0]), spec[1]
        count = int(np.prod(shape, dtype=np.int64))
        out.append(np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape))
        offset += count * dtype.itemsize
    return out


class _Frames(asyncio.BufferedProtocol):
    """Both ends of a connection: reads each frame straight into its own buffer (no stream
    buffer to copy through), hands it to ``on_frame(call_id, meta, body, offset)``; writes
    with flow control (:meth:`send` waits while the kernel's buffer is full)."""

    def __init__(self, on_frame, on_lost):
        self.on_frame, self.on_lost = on_frame, on_lost
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(_HEAD.size)
        self._buf, self._got = self._head, 0
        self._frame: tuple[int, int] | None = None  # (call id, meta bytes) of the body being read
        self._can_write: asyncio.Future | None = None
        self.lost: BaseException | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._buf)[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        self._got += nbytes
        if self._got < len(self._buf):
            return
        if self._frame is None:  # a header: its body next
            rest, call_id, meta_len = _HEAD.unpack(self._head)
            if rest > MAX_FRAME_BYTES or meta_len > rest:
                return self._refuse(f"a frame header that says {rest} bytes with {meta_len} of meta")
            self._frame, self._buf, self._got = (call_id, meta_len), bytearray(rest), 0
            if rest:
                return
        (call_id, meta_len), body = self._frame, self._buf
        self._frame, self._buf, self._got = None, self._head, 0
        try:
            meta = json.loads(bytes(body[:meta_len]))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as e:
            return self._refuse(f"a frame whose meta is not a JSON object ({e})")
        self.on_frame(call_id, meta, body, meta_len)

    def _refuse(self, what: str) -> None:
        """Not this protocol: drop the connection (its calls fail with ChannelBroken), read nothing more."""
        self.lost = ConnectionAbortedError(f"the peer sent {what}")
        self._buf, self._got, self._frame = bytearray(_HEAD.size), 0, None
        if self.transport is not None:
            self.transport.abort()

    def send(self, frame: list) -> Awaitable[None] | None:
        """Writes a frame; returns something to await when the write buffer is full."""
        if self.lost is not None:
            raise ConnectionResetError(str(self.lost))
        if sum(len(b) for b in frame) <= _JOIN_BELOW:
            self.transport.write(b"".join(frame))
        else:  # each piece goes to the socket at once while the buffer is empty: no joined copy
            for piece in frame:
                if len(piece):
                    self.transport.write(piece)
        return self._can_write

    def pause_writing(self) -> None:
        if self._can_write is None:
            self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = self.lost or exc or ConnectionResetError("connection closed")
        waiter, self._can_write = self._can_write, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(str(self.lost)))
        self.on_lost(self.lost)


_JOIN_BELOW = 64 * 1024  # smaller frames go in one write (one syscall)


class ChannelServer:
    """Serves ``handlers`` (method name -> async (arrays, deadline) -> arrays) on ``host`` at a
    port the system picks. Each call runs as its own task on the loop that :meth:`start`
    runs on, so concurrent calls meet in the replica's batcher."""

    def __init__(self, handlers: dict[str, Handler], host: str):
        self.handlers = handlers
        self._sock = socket.create_server((host, 0), backlog=128)
        self.host, self.port = host, self._sock.getsockname()[1]
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connections: set[_Frames] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, sock=self._sock)

    def _connection(self) -> _Frames:
        def on_frame(call_id, meta, body, offset):
            task = asyncio.ensure_future(self._answer(conn, call_id, meta, body, offset))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        conn = _Frames(on_frame, lambda _: self._connections.discard(conn))
        self._connections.add(conn)
        return conn

    async def _answer(self, conn: _Frames, call_id: int, meta: dict, body: bytearray, offset: int) -> None:
        try:
            handler = self.handlers.get(meta.get("m"))
            if handler is None:
                raise LookupError(f"no method {meta.get('m')!r} on this replica's data plane")
            deadline = meta.get("d")
            work = handler(_arrays(meta["a"], body, offset), deadline)
            if deadline is None:
                out = await work
            else:  # the caller stops waiting then: so does the work (and what it waits on)
                try:
                    out = await asyncio.wait_for(work, max(deadline - time.time(), 0.0))
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"{meta.get('m')}: the caller's deadline passed") from None
            specs, buffers = _describe(out)
            frame = _frame(call_id, {"a": specs}, buffers)
        except Exception as e:  # noqa: BLE001  every error goes back to the caller, typed
            frame = _frame(call_id, {"e": 1}, [_pickled(e)])
        if conn.lost is not None:
            return  # the caller went away
        try:
            full = conn.send(frame)
            if full is not None:
                await full
        except ConnectionError:
            pass

    def close(self) -> None:
        """Stop accepting and drop the connections (their callers see ChannelBroken)."""
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()
        for t in list(self._tasks):
            t.cancel()


def _pickled(error: BaseException) -> bytes:
    try:
        return pickle.dumps(error)
    except Exception:  # noqa: BLE001  an exception that does not pickle: its type and text
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))


class Channel:
    """The caller's end of one connection to one replica (connects on first use, on the loop
    of the first call). :meth:`call` is safe to run concurrently from one event loop."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float = 2.0):
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.broken: BaseException | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._conn: _Frames | None = None
        self._connecting: asyncio.Future | None = None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def call(self, method: str, arrays: Arrays, *, deadline: float | None = None) -> list:
        """The method's arrays; raises what the method raised, or ChannelBroken."""
        if self._conn is None:
            await self._connect()
        if self.broken is not None:
            raise ChannelBroken(f"{self.host}:{self.port}: {self.broken}")
        call_id = next(self._ids)
        specs, buffers = _describe(arrays)
        reply = asyncio.get_running_loop().create_future()
        self._pending[call_id] = reply
        try:
            full = self._conn.send(_frame(call_id, {"m": method, "a": specs, "d": deadline}, buffers))
            if full is not None:
                await full
            return await reply
        except ConnectionError as e:
            if isinstance(e, ChannelBroken):
                raise
            self._break(e)
            raise ChannelBroken(f"{self.host}:{self.port}: {e}") from e
        finally:
            self._pending.pop(call_id, None)

    async def _connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Frames(self._on_reply, self._break), self.host, self.port),
                self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as e:
            self.broken = e if isinstance(e, OSError) else TimeoutError("connect timed out")
            raise ChannelBroken(f"{self.host}:{self.port}: {self.broken}") from None
        self._conn = conn

    def _on_reply(self, call_id: int, meta: dict, body: bytearray, offset: int) -> None:
        reply = self._pending.get(call_id)
        if reply is None or reply.done():
            return  # its caller gave up
        if meta.get("e"):
            reply.set_exception(pickle.loads(body[offset:]))
        else:
            reply.set_result(_arrays(meta["a"], body, offset))

    def _break(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(ChannelBroken(f"{self.host}:{self.port}: {error}"))
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()

    def close(self) -> None:
        self._break(ConnectionAbortedError("channel closed"))
