"""A grpc.aio server on its own event loop in a background thread, for synchronous callers
(tests, benchmarks, the load-test fixtures)::

    with MonolithThread("artifacts/default") as running:   # a ServerThread
        RankingClient(f"127.0.0.1:{running.port}").predict(...)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import grpc


class ServerThread:
    """Runs ``start_server()`` (a coroutine returning ``(server, port)``) until :meth:`stop`."""

    def __init__(self, start_server: Callable[[], Awaitable[tuple[grpc.aio.Server, int]]], *, name: str, grace_s: float):
        self._start_server = start_server
        self._grace_s = grace_s
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server, self.port = self._loop.run_until_complete(self._start_server())
        except BaseException as e:  # noqa: BLE001  re-raised in start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self):
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=self._grace_s), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def serve_until_signalled(server: grpc.aio.Server, *, grace_s: float, name: str,
                                before_stop: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop gracefully (in-flight calls get ``grace_s``);
    ``before_stop`` runs first (a front that stops taking calls, in a thread).

    Explicit handlers, so a server started in the background (where a shell leaves SIGINT
    ignored) or by a supervisor (SIGTERM) still stops cleanly."""
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        print(f"{name}: stopping ...", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if before_stop is not None:
            await asyncio.to_thread(before_stop)
        await server.stop(grace=grace_s)
        print(f"{name}: stopped", flush=True)
