"""A server's door for its Predict calls: at most ``max_in_flight`` work at once, ``max_queued``
more wait for a slot, the rest are refused at once (:class:`DoorRefused`, RESOURCE_EXHAUSTED);
adaptive, the slots follow the knee of the throughput (serving/engine/concurrency.py). Ray-free
and grpc-free: the Router replicas' own gRPC servers (serving/app/grpc_ingress.py) and the
monolith (serving/standalone/monolith.py) put their handlers behind one
(serving/api/wire.py's ``behind_door``).

Example::

    door = Door(max_in_flight=32, max_queued=32, adaptive=True)
    scores = await door.through(left_s, lambda: score(request))   # raises DoorRefused
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from typing import Any, Awaitable, Callable

from serving.api.errors import DoorRefused
from serving.engine.concurrency import KneeConfig, KneeLimit, may_wait
from serving.engine.occupancy import TimeAverage

# a call's time in a slot: the median of the newest _SERVED_WINDOW, once _SERVED_MIN are known
_SERVED_WINDOW = 32
_SERVED_MIN = 4


class Door:
    """Predict's slots: ``max_in_flight`` at once, ``max_queued`` more wait for one, the rest
    are refused (gRPC's core refuses most of them before this; the control slack ends here).

    ``adaptive``: the number of slots follows the knee of the server's throughput
    (serving/engine/concurrency.py), up to ``max_in_flight``, and a quarter as many (at least
    one, at most ``max_queued``) may wait: under overload an admitted call waits behind no more
    calls than the throughput needs, and the others are refused at once.

    A call that would have to wait is also refused at once when it cannot be answered before its
    deadline: the queue ahead of it (``waiting + 1`` calls over the slots) and its own time in a
    slot, each slot's time the median of the newest calls', exceed the time it has left. Without
    this it waited in the queue and was then shed by the admission (or expired): told
    late, at the cost of a queue place."""

    def __init__(self, max_in_flight: int, max_queued: int, adaptive: bool | KneeConfig = False,
                 on_depth: Callable[[int], None] | None = None):
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self.on_depth = on_depth
        if adaptive is True:
            adaptive = KneeConfig(max_limit=max_in_flight)
        self.adaptive = KneeLimit(adaptive) if adaptive else None
        self._told = self.depth()  # the depth last given to on_depth
        self._served: deque[float] = deque(maxlen=_SERVED_WINDOW)  # seconds in a slot, newest last
        self._queue: deque[asyncio.Future] = deque()  # calls waiting for a slot, oldest first
        self.working = 0
        self._in_door = TimeAverage()  # calls working and waiting

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def slots(self) -> int:
        """How many calls may work at once now."""
        return self.adaptive.limit if self.adaptive is not None else self._max_in_flight

    def may_wait(self) -> int:
        """How many calls may wait for a slot now."""
        return may_wait(self.slots(), self._max_queued, adaptive=self.adaptive is not None)

    def depth(self) -> int:
        """Calls this door takes now, working and waiting."""
        return self.slots() + self.may_wait()

    def load(self) -> float:
        """The mean number of Predict calls in the door (working and waiting) since the last
        call of this method (or since the door opened); adapting, scaled to ``max_in_flight`` as
        the door's depth (a door full at a limit of 8 of 32 reports 32), so that an autoscaler
        that aims at half of ``max_in_flight`` sees a full door as one."""
        mean = self._in_door.mean()
        return mean * self._max_in_flight / self.slots() if self.adaptive is not None else mean

    def _changed(self) -> None:
        """After a call took or left a slot: the adaptive limit hears whether the door is full, and
        the front its new depth."""
        if self.adaptive is None:
            return
        self.adaptive.observe(time.monotonic(), full=self.working >= self.slots())
        if self.on_depth is not None and self.depth() != self._told:
            self._told = self.depth()
            self.on_depth(self._told)

    def too_late(self, left_s: float | None) -> str | None:
        """Why a call with ``left_s`` seconds to its deadline cannot wait its turn, or None."""
        if left_s is None or len(self._served) < _SERVED_MIN:
            return None
        slot = statistics.median(self._served)
        wait = (self.waiting + 1) * slot / self.slots()
        if wait + slot <= left_s:
            return None
        return (f"overloaded: ~{wait * 1000:.0f} ms of queue ahead and ~{slot * 1000:.0f} ms to answer "
                f"exceed the {left_s * 1000:.0f} ms left before the deadline")

    def _refusal(self, left_s: float | None) -> str | None:
        """Why a call that finds every slot taken is refused, or None (it waits)."""
        if self.waiting >= self.may_wait():
            if self.adaptive is not None:
                return (f"overloaded: this server works on {self.working} requests, the depth at which its "
                        f"throughput levels off now (of at most {self._max_in_flight}), and {self.waiting} wait; "
                        f"retry later")
            return f"overloaded: {self._max_queued} requests already wait for this server"
        return self.too_late(left_s)

    def _release(self) -> None:
        self.working -= 1
        while self._queue and self.working < self.slots():
            turn = self._queue.popleft()
            if not turn.done():
                self.working += 1
                turn.set_result(None)
        self._changed()

    async def _enter(self, left_s: float | None) -> None:
        """Take a slot (waiting for one if need be); DoorRefused when it is refused."""
        if self.working < self.slots() and not self._queue:
            self.working += 1
            self._changed()
            return
        why = self._refusal(left_s)
        if why:
            raise DoorRefused(why)
        turn = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # the slot was given as the call was cancelled: pass it on
            else:
                self._queue.remove(turn)
            raise

    async def through(self, left_s: float | None, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call()``'s result once it has a slot (``left_s``: seconds to the caller's deadline, None
        for none); DoorRefused, before ``call`` runs, when the door refuses it."""
        self._in_door.add(1)
        try:
            await self._enter(left_s)
            started = time.monotonic()
            try:
                return await call()
            finally:
                answered = time.monotonic()
                self._served.append(answered - started)
                if self.adaptive is not None:
                    self.adaptive.completed(answered)
                self._release()
        finally:
            self._in_door.add(-1)
