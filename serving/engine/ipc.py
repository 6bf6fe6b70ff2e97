"""Pooled embeddings that stay on the GPU between the shards and the dense tower
(``AppArgs.pooled_transport`` "ipc"; "host" is the pinned-host path).

On the host path every pooled embedding crosses PCIe twice and a socket once: the shard's
D2H into pinned memory, the frame to the tower, the tower's H2D. With "ipc" the tower owns a
ring of device buffers (:class:`PooledRing`), shares it once through CUDA IPC, and each shard
call carries where in it to write::

    tower   slot = ring.lease(B x sum_k C_k x D)            one slot of the ring (or None: host path)
            shard k <- [lengths, values, weights, ring.handle, [offset_k]]
    shard   RingViews.target(handle, offset_k, B, C_k x D)    the ring opened once per tower replica,
                                                              only on the same host and GPU
            pooled[:B] -> the target (a copy: never the CUDA graph's static output buffer),
            bad-id flag D2H, one stream sync                 -> answers [None]   ([pooled]: host path)
    tower   parts[k] = ring.view(slot, offset_k, ...): assembled on the device, scored, released

A slot is reused only when nothing can still write or read it (:class:`SlotRing`): released when
every shard call sent to it was answered and the score that reads it returned. A shard answers,
with its output or with an error (its deadline passed), only once no lookup of its can write the
slot any more: a lookup that starts later leaves it alone, and the one running has finished
(``Shard.lookup``). A tower call cancelled at its deadline does not cancel that batch: it runs on,
unscored, until the shards have answered (``DenseTower._ring_batch``). Quarantined, until the
calls' deadline plus ``QUARANTINE_S``, only when a call went unanswered: its connection broke (and
it was resent), so that replica may still be finishing a lookup into it. A call hedged to a second
replica is answered twice: the slot comes back once both have answered.
Quarantined at every cancel, as before, the slots ran out under overload (one H100, 550 req/s:
60% of the batches by the host path) and the stack collapsed. The fence that bounds the quarantine:
a shard never queues a copy into a slot once the call's deadline has passed
(``ShardCore.lookup_many``; shard and tower share the host's clock), so a late write can only
be one queued before the deadline and still in the shard's GPU stream, milliseconds behind.
Calls without a deadline have no fence: their slot waits ``NO_DEADLINE_QUARANTINE_S``. A batch
that finds no free slot, or is larger than a slot, goes by the host path: never refused.

A shard keeps the rings it opened (at most 16) and closes one unused for IDLE_CLOSE_S when it
opens another: a replaced tower's ring would otherwise stay allocated on the GPU.

Identity: a handle names its ring (16 random bytes), the host (Linux boot id) and the GPU
(its UUID). A shard opens it only when both match its own; else, or when CUDA refuses to open
it (another container without a shared IPC namespace), it answers by the host path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import time
from dataclasses import dataclass, field

import numpy as np
import torch

QUARANTINE_S = 2.0  # after an abandoned call's deadline, before its slot is reused: the fence's margin (a copy
# queued before the deadline, behind the shard's GPU stream; 10 s before the fence, while a burst of expired calls
# could quarantine every slot and send all batches by the host path for that long)
NO_DEADLINE_QUARANTINE_S = 60.0  # the same for calls that carry no deadline
_ID_BYTES = 16
_OPEN_RINGS = 16  # rings a shard keeps open (tower replicas it has served); the oldest closed first
IDLE_CLOSE_S = 60.0  # a ring not written for this long is closed when another is opened (its tower was
# replaced or scaled away: an open handle keeps a dead tower's ring allocated on the GPU)
logger = logging.getLogger("ray.serve")


def host_id() -> str:
    """This machine's boot id (one per running kernel: containers on one host share it)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def gpu_id(device: torch.device) -> str:
    """The GPU's UUID ('' for a CPU device: no ring matches it)."""
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else ""


class SlotRing:
    """``slots`` slots handed out one per batch, reused once released; a quarantined slot
    comes back when its time has passed. ``clock``: seconds, monotonic (``time.time`` units
    also work as long as the quarantine times use the same)."""

    def __init__(self, slots: int, *, clock=time.time):
        if slots < 1:
            raise ValueError(f"slots: at least 1, got {slots}")
        self.slots = slots
        self._free = collections.deque(range(slots))
        self._quarantined: list[tuple[float, int]] = []  # (free again at, slot)
        self._clock = clock
        self.leased = self.fell_back = self.quarantines = 0  # counters (batches)

    def lease(self) -> int | None:
        """A free slot, or None (every slot in use or quarantined)."""
        if self._quarantined:
            now = self._clock()
            back = [s for until, s in self._quarantined if until <= now]
            if back:
                self._quarantined = [(u, s) for u, s in self._quarantined if u > now]
                self._free.extend(back)
        if not self._free:
            self.fell_back += 1
            return None
        self.leased += 1
        return self._free.popleft()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def settle(self, slot: int, *, clean: bool, deadline: float | None) -> None:
        """After a batch: released when every call to the slot answered (``clean``), else
        quarantined (``deadline``: the calls')."""
        if clean:
            self.release(slot)
        else:
            self.quarantine(slot, deadline)

    def quarantine(self, slot: int, deadline: float | None) -> None:
        """Back after ``deadline`` (the ``clock``'s time) + QUARANTINE_S, or NO_DEADLINE_QUARANTINE_S from now."""
        now = self._clock()
        until = now + NO_DEADLINE_QUARANTINE_S if deadline is None else max(deadline, now) + QUARANTINE_S
        self._quarantined.append((until, slot))
        self.quarantines += 1


@dataclass
class Lease:
    """One batch's slot: shard k writes at ``offsets[k]`` (elements from the ring's start)."""

    slot: int
    offsets: dict[int, int]  # shard -> first element of its [B, C_k x D] part
    abandoned: bool = False  # a call was resent after a broken connection: the slot is quarantined
    racing: list = field(default_factory=list)  # hedged calls that lost the race, running on to their answers

    def abandon(self, call: asyncio.Future | None = None) -> None:
        """A call to this slot also went to a second replica (DirectPlane.call's ``on_resend``):
        ``call``, the one that lost the race, still runs and must be answered before the slot is
        released (:func:`all_answered`); None (a broken connection): its replica may write it
        until the fence, so the slot is quarantined."""
        if call is None:
            self.abandoned = True
        else:
            self.racing.append(call)


def answered(call: asyncio.Future) -> bool:
    """Whether a finished call into a slot was answered by its replica: an error the replica sent
    is an answer; no connection (ChannelBroken, NoReplica) or a cancel is none."""
    return not call.cancelled() and not isinstance(call.exception(), ConnectionError)


async def all_answered(calls: list[asyncio.Future], deadline: float | None) -> bool:
    """Whether each of ``calls`` was :func:`answered` by ``deadline`` (time.time()) plus
    QUARANTINE_S, when the fence would release the slot anyway."""
    wait_s = QUARANTINE_S + (max(0.0, deadline - time.time()) if deadline is not None else NO_DEADLINE_QUARANTINE_S)
    done, pending = await asyncio.wait(calls, timeout=wait_s)
    return not pending and all(answered(c) for c in done)


class PooledRing:
    """The tower's ring: ``slots`` device buffers of ``slot_elems`` elements of ``dtype``,
    shared through CUDA IPC (:attr:`handle` travels in every shard call: ~400 bytes)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, slots: int, slot_elems: int):
        if device.type != "cuda":
            raise ValueError(f"pooled_transport 'ipc' needs a CUDA device (the tower runs on {device})")
        self.device, self.dtype, self.slot_elems = device, dtype, slot_elems
        self.buffer = torch.zeros(slots * slot_elems, dtype=dtype, device=device)  # [slots * slot_elems]
        self.ring = SlotRing(slots)
        shared = self.buffer.untyped_storage()._share_cuda_()  # (device, handle, size, offset, refs..., event...)
        offset = self.buffer.storage_offset() * self.buffer.element_size()
        self.handle = np.frombuffer(os.urandom(_ID_BYTES) + pickle.dumps({
            "host": host_id(), "gpu": gpu_id(device), "storage": shared[1:], "offset_bytes": offset,
            "dtype": str(dtype).removeprefix("torch."), "elems": self.buffer.numel()}), np.uint8)  # [bytes]

    def fits(self, batch: int, widths: dict[int, int]) -> bool:
        """Whether a batch of ``batch`` examples, shard k writing [batch, widths[k]], fits one slot."""
        return batch * sum(widths.values()) <= self.slot_elems

    def lease(self, batch: int, widths: dict[int, int]) -> Lease | None:
        """A slot for a batch of ``batch`` examples, shard k writing [batch, widths[k]]; None
        when it does not fit one slot or none is free (the host path takes the batch)."""
        if not self.fits(batch, widths):
            self.ring.fell_back += 1
            return None
        slot = self.ring.lease()
        if slot is None:
            return None
        offsets, at = {}, slot * self.slot_elems
        for k, width in widths.items():
            offsets[k] = at
            at += batch * width
        return Lease(slot, offsets)

    def view(self, lease: Lease, shard: int, batch: int, width: int) -> torch.Tensor:
        """Shard ``shard``'s part of a leased slot: [batch, width] on the device."""
        start = lease.offsets[shard]
        return self.buffer[start:start + batch * width].view(batch, width)

    def settle(self, lease: Lease, *, failed: bool, deadline: float | None) -> bool:
        """After the batch: the slot back to the ring, or into quarantine when a call to it went
        unanswered (``failed``, or resent after a broken connection: ``lease.abandoned``;
        ``deadline``: the calls', time.time()). Returns whether it was quarantined."""
        clean = not (failed or lease.abandoned)
        self.ring.settle(lease.slot, clean=clean, deadline=deadline)
        return not clean


class RingViews:
    """A shard's side: the rings of the towers it serves, opened once each."""

    def __init__(self, device: torch.device, *, clock=time.monotonic):
        self.device = device
        self._host, self._gpu = host_id(), gpu_id(device)
        self._clock = clock
        # ring id -> (the ring or None: not reachable from here, last used)
        self._open: collections.OrderedDict[bytes, tuple[torch.Tensor | None, float]] = collections.OrderedDict()
        self.refused: dict[str, int] = collections.Counter()  # why rings were not opened

    def target(self, handle: np.ndarray, offset: int, batch: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Where to write a [batch, width] output of ``dtype`` in the ring ``handle`` names, or
        None when this process cannot reach it (another host or GPU, CUDA refused, another dtype)."""
        ring = self._ring(handle)
        if ring is None or ring.dtype != dtype or offset < 0 or offset + batch * width > ring.numel():
            return None
        return ring[offset:offset + batch * width].view(batch, width)

    def _ring(self, handle: np.ndarray) -> torch.Tensor | None:
        key, now = handle[:_ID_BYTES].tobytes(), self._clock()
        if key in self._open:
            self._open.move_to_end(key)
            ring = self._open[key][0]
            self._open[key] = (ring, now)
            return ring
        for old in [k for k, (_, used) in self._open.items() if now - used > IDLE_CLOSE_S]:
            del self._open[old]  # closed with its last reference (a target still being written keeps it)
        ring = self._opened(pickle.loads(handle[_ID_BYTES:].tobytes()))
        self._open[key] = (ring, now)
        if len(self._open) > _OPEN_RINGS:
            self._open.popitem(last=False)  # the least recently used
        return ring

    @property
    def open_rings(self) -> int:
        return sum(ring is not None for ring, _ in self._open.values())

    def _opened(self, desc: dict) -> torch.Tensor | None:
        why = None
        if desc["host"] != self._host or not self._host:
            why = "another host"
        elif desc["gpu"] != self._gpu or not self._gpu:
            why = "another GPU"
        else:
            try:
                storage = torch.UntypedStorage._new_shared_cuda(self.device.index, *desc["storage"])
            except RuntimeError as e:  # e.g. another container without a shared IPC namespace
                why = f"CUDA refused the handle ({e})"
        if why is not None:
            self.refused[why.split(" (")[0]] += 1
            logger.warning("pooled embeddings: a tower's ring is on %s: this shard answers it by the host", why)
            return None
        dtype = getattr(torch, desc["dtype"])
        ring = torch.empty(0, dtype=dtype, device=self.device)
        ring.set_(storage, desc["offset_bytes"] // ring.element_size(), (desc["elems"],), (1,))
        return ring
