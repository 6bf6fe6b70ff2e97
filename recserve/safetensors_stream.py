"""Write a safetensors file one tensor (or one chunk of rows) at a time, from one thread or many.

``safetensors.torch.save_file`` needs every tensor in memory at once; a shard of a large
model does not fit that way. The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the raw bytes in header order. We know every shape before writing (from the
plan), so the header goes first and the data follows chunk by chunk. Reading uses the
real ``safetensors`` library (memory-mapped, no pickle).

Two ways to fill the data:

- :meth:`StreamingSafetensorsWriter.write` appends chunks in file order (one thread).
- :meth:`~StreamingSafetensorsWriter.write_at` writes a chunk at its byte offset
  (``os.pwrite``, safe from several threads at once), and :meth:`~StreamingSafetensorsWriter.hash_next`
  then feeds the same bytes to the file's sha256 in file order (one thread). :meth:`close`
  fails unless every byte was hashed, in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float32: ("F32", 4),
    torch.float16: ("F16", 2),
    torch.bfloat16: ("BF16", 2),
    torch.uint8: ("U8", 1),
    torch.int64: ("I64", 8),
    torch.int32: ("I32", 4),
}


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPE_NAMES[self.dtype][1]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, row-major (a view where it is contiguous)."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


class StreamingSafetensorsWriter:
    """Declare every tensor up front, then write their bytes in declared order.

    The sha256 of the whole file is computed while writing (:meth:`close` returns it).
    """

    def __init__(self, path: Path, slots: list[TensorSlot], metadata: dict[str, str] | None = None):
        self.path = path
        self.slots = slots
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        self._start: dict[str, int] = {}  # slot name -> offset of its data in the data section
        for slot in slots:
            header[slot.name] = {
                "dtype": _DTYPE_NAMES[slot.dtype][0],
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + slot.nbytes],
            }
            self._start[slot.name] = offset
            offset += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._data = 8 + len(raw)  # file offset of the data section
        self.nbytes = self._data + offset  # bytes of the whole file
        self._hash = hashlib.sha256()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.nbytes)
        self._hashed = 0  # file bytes hashed so far (all of them written)
        head = struct.pack("<Q", len(raw)) + raw
        self._pwrite(0, memoryview(head))
        self.hash_next(0, memoryview(head))
        self._slot = 0  # sequential writing: the current slot and the bytes written of it
        self._written = 0

    def offset(self, slot_name: str) -> int:
        """File offset of a tensor's first byte."""
        return self._data + self._start[slot_name]

    def _pwrite(self, offset: int, data: memoryview) -> None:
        while data:
            n = os.pwrite(self._fd, data, offset)
            data, offset = data[n:], offset + n

    def write_at(self, offset: int, chunk: torch.Tensor) -> memoryview:
        """Write a CPU tensor's bytes at file ``offset`` (thread-safe); returns the bytes,
        which the caller hands to :meth:`hash_next` in file order."""
        data = tensor_bytes(chunk)
        if offset < self._data or offset + len(data) > self.nbytes:
            raise ValueError(f"{self.path}: bytes [{offset}, {offset + len(data)}) fall outside the data section")
        self._pwrite(offset, data)
        return data

    def hash_next(self, offset: int, data: memoryview) -> None:
        """Add the next bytes of the file, already written at ``offset``, to its sha256."""
        if offset != self._hashed:
            raise ValueError(f"{self.path}: bytes hashed out of order (at {offset}, expected {self._hashed})")
        self._hash.update(data)  # releases the GIL for large buffers
        self._hashed += len(data)

    def write(self, chunk: torch.Tensor) -> None:
        """Append the bytes of ``chunk`` (all or part of the current tensor, row-major)."""
        self._skip_empty()
        if self._slot == len(self.slots):
            raise ValueError(f"{self.path}: every declared tensor is already written")
        slot = self.slots[self._slot]
        if chunk.dtype != slot.dtype:
            raise ValueError(f"{self.path}: tensor {slot.name} is {slot.dtype}, got a {chunk.dtype} chunk")
        if self._written + chunk.numel() * chunk.element_size() > slot.nbytes:
            raise ValueError(f"{self.path}: too many bytes for tensor {slot.name}")
        at = self.offset(slot.name) + self._written
        self.hash_next(at, self.write_at(at, chunk))
        self._written += chunk.numel() * chunk.element_size()
        if self._written == slot.nbytes:
            self._slot += 1
            self._written = 0

    def _skip_empty(self) -> None:
        while self._slot < len(self.slots) and self.slots[self._slot].nbytes == 0:
            self._slot += 1  # zero-sized tensors need no bytes

    def close(self) -> str:
        """Finish the file; returns its sha256. Fails if a declared tensor is incomplete."""
        os.close(self._fd)
        if self._hashed != self.nbytes:
            missing = next((s.name for s in self.slots if self.offset(s.name) + s.nbytes > self._hashed), "?")
            raise ValueError(f"{self.path}: tensor {missing} was not fully written")
        return self._hash.hexdigest()
