"""The data plane's frames (serving/engine/channel.py) over real TCP on 127.0.0.1: arrays come
back bit for bit, errors keep their class, replies out of order reach their callers, a caller
that gives up leaves the connection usable, a replica that goes away fails its calls at once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.api.errors import DeadlineExceeded, InvalidRequest
from serving.engine.channel import Channel, ChannelBroken, ChannelServer


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _served(handlers):
    server = ChannelServer(handlers, "127.0.0.1")
    await server.start()
    return server, Channel("127.0.0.1", server.port)


async def _echo(arrays, deadline):
    return list(arrays)


def test_arrays_of_every_dtype_and_shape_come_back_bit_for_bit_with_none_kept():
    rng = np.random.default_rng(0)
    sent = [rng.integers(-2**40, 2**40, size=(3, 5)).astype(np.int64), None,
            rng.standard_normal((7, 26 * 16)).astype(np.float16), np.zeros((0, 4), np.float32),
            np.arange(12, dtype=np.int32)[::3],  # not contiguous: sent as a copy
            rng.standard_normal(9).astype(np.float32).reshape(3, 3).T, np.float64(2.5) * np.ones(())]

    async def main():
        server, channel = await _served({"echo": _echo})
        try:
            return await channel.call("echo", sent)
        finally:
            channel.close()
            server.close()

    got = _run(main())
    assert len(got) == len(sent)
    for want, out in zip(sent, got):
        if want is None:
            assert out is None
            continue
        assert out.dtype == want.dtype and out.shape == want.shape
        np.testing.assert_array_equal(out, want)


def test_a_largest_request_s_pooled_embeddings_pass_intact():
    pooled = np.random.default_rng(1).standard_normal((4096, 26 * 128)).astype(np.float32)  # 54 MB

    async def main():
        server, channel = await _served({"echo": _echo})
        try:
            return await channel.call("echo", [pooled])
        finally:
            channel.close()
            server.close()

    np.testing.assert_array_equal(_run(main())[0], pooled)


def test_errors_keep_their_class_and_message_and_an_unknown_method_is_named():
    async def fail(arrays, deadline):
        if arrays[0][0] == 0:
            raise InvalidRequest("sparse['item_id'].values", "id 99 out of range")
        raise DeadlineExceeded(f"late by {deadline}")

    async def main():
        server, channel = await _served({"fail": fail, "echo": _echo})
        try:
            with pytest.raises(InvalidRequest) as bad:
                await channel.call("fail", [np.zeros(1)])
            assert bad.value.field == "sparse['item_id'].values"
            with pytest.raises(DeadlineExceeded, match="late by 4102444800"):
                await channel.call("fail", [np.ones(1)], deadline=4102444800.0)  # the deadline reaches the method
            with pytest.raises(LookupError, match="no method 'lookup'"):
                await channel.call("lookup", [])
            return (await channel.call("echo", [np.arange(3)]))[0].tolist()  # the connection survives errors
        finally:
            channel.close()
            server.close()

    assert _run(main()) == [0, 1, 2]


def test_concurrent_calls_get_their_own_replies_in_any_order_and_a_caller_that_gives_up_does_not_break_others():
    async def slow(arrays, deadline):
        await asyncio.sleep(float(arrays[0][0]))
        return [arrays[0] * 10]

    async def main():
        server, channel = await _served({"slow": slow})
        try:
            delays = [0.3, 0.0, 0.2, 0.05, 0.1]
            got = await asyncio.gather(*(channel.call("slow", [np.array([d])]) for d in delays))
            assert [float(g[0][0]) for g in got] == [d * 10 for d in delays]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(channel.call("slow", [np.array([0.5])]), 0.05)
            assert channel.in_flight == 0
            after = await channel.call("slow", [np.array([0.0])])
            await asyncio.sleep(0.6)  # the abandoned reply arrives and is dropped
            return float(after[0][0]), channel.broken
        finally:
            channel.close()
            server.close()

    assert _run(main()) == (0.0, None)


def test_work_past_the_deadline_the_call_carries_is_cancelled_on_the_replica():
    import time

    cancelled = []

    async def slow(arrays, deadline):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main():
        server, channel = await _served({"slow": slow, "echo": _echo})
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="slow: the caller's deadline passed"):
                await channel.call("slow", [], deadline=time.time() + 0.2)
            took = time.monotonic() - started
            return took, cancelled, (await channel.call("echo", [np.ones(2)], deadline=time.time() + 5))[0].tolist()
        finally:
            channel.close()
            server.close()

    took, was_cancelled, after = _run(main())
    assert 0.15 < took < 5 and was_cancelled == [True] and after == [1.0, 1.0]


def test_a_peer_that_does_not_speak_the_protocol_is_dropped_and_others_are_served():
    import socket
    import struct

    async def main():
        server, channel = await _served({"echo": _echo})
        try:
            loop = asyncio.get_running_loop()
            for garbage in (struct.pack("<QQI", 1 << 62, 1, 0),  # a length no frame has
                            struct.pack("<QQI", 4, 1, 9),  # meta longer than the frame
                            struct.pack("<QQI", 3, 1, 3) + b"[1]",  # meta not an object
                            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(garbage)
                await writer.drain()
                try:  # dropped (a reset or an end of stream), nothing answered
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                except ConnectionResetError:
                    pass
                writer.close()
            # a replica that answers garbage: the caller's call fails, it does not hang
            liar = socket.create_server(("127.0.0.1", 0))
            liar.setblocking(False)

            async def lie():
                conn, _ = await loop.sock_accept(liar)
                await loop.sock_recv(conn, 1 << 16)
                await loop.sock_sendall(conn, struct.pack("<QQI", 1 << 62, 1, 0))
                await asyncio.sleep(1)
                conn.close()

            lying = asyncio.ensure_future(lie())
            with pytest.raises(ChannelBroken, match="frame header"):
                await Channel("127.0.0.1", liar.getsockname()[1]).call("echo", [np.ones(1)])
            await lying
            liar.close()
            return (await channel.call("echo", [np.arange(4)]))[0].tolist()
        finally:
            channel.close()
            server.close()

    assert _run(main()) == [0, 1, 2, 3]


def test_a_replica_that_goes_away_fails_calls_in_flight_and_later_ones_at_once():
    async def hang(arrays, deadline):
        await asyncio.sleep(60)

    async def main():
        server, channel = await _served({"hang": hang})
        call = asyncio.ensure_future(channel.call("hang", [np.zeros(1)]))
        await asyncio.sleep(0.1)
        server.close()
        with pytest.raises(ChannelBroken):
            await asyncio.wait_for(call, 5)
        with pytest.raises(ChannelBroken):
            await channel.call("hang", [np.zeros(1)])
        with pytest.raises(ChannelBroken, match="127.0.0.1"):  # nobody listens there any more
            await Channel("127.0.0.1", server.port).call("hang", [np.zeros(1)])

    _run(main())
