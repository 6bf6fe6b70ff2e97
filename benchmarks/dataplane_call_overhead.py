"""What DirectPlane.call costs over a bare Channel.call: 3,000 sequential echo calls of 64 floats on
127.0.0.1 in one process (no GCS: a fixed endpoint), after 200 warm-up calls that give the hedging its
P90 (so every call arms the hedge timer).

    .venv/bin/python benchmarks/dataplane_call_overhead.py
"""
import asyncio, time, sys
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from serving.app.dataplane import DirectPlane
from serving.engine.channel import Channel, ChannelServer

async def echo(arrays, deadline):
    return [arrays[0]]

async def main():
    server = ChannelServer({"lookup": echo}, "127.0.0.1")
    await server.start()
    ch = Channel("127.0.0.1", server.port)
    x = [np.zeros(64, np.float32)]
    for _ in range(200): await ch.call("lookup", x)
    t = time.perf_counter(); n = 3000
    for _ in range(n): await ch.call("lookup", x)
    bare = (time.perf_counter() - t) / n
    plane = DirectPlane()
    # the plane's call path without the GCS: a fixed endpoint list
    plane._endpoints["a"] = (time.monotonic() + 1e9, {"d": [("r", "127.0.0.1", server.port, "v")]})
    for _ in range(200): await plane.call("a", "d", "lookup", x, version="v")
    t = time.perf_counter()
    for _ in range(n): await plane.call("a", "d", "lookup", x, version="v")
    hedged = (time.perf_counter() - t) / n
    print(f"Channel.call {bare*1e6:.0f} us; DirectPlane.call (hedging armed: p90 known) {hedged*1e6:.0f} us; "
          f"difference {(hedged-bare)*1e6:.0f} us per call; hedges {plane.hedges}")
asyncio.run(main())
