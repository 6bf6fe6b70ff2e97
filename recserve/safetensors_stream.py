"""Write a safetensors file one tensor (or one chunk of rows) at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; a shard of a large
model does not fit that way. The format is simple enough to stream: an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape and byte
range, then the raw bytes in header order. We know every shape before writing (from the
plan), so the header goes first and the data follows chunk by chunk. Reading uses the
real ``safetensors`` library (memory-mapped, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


class StreamingSafetensorsWriter:
    """Declare every tensor up front, then :meth:`write` their bytes in declared order.

    The sha256 of the whole file is computed while writing (:attr:`sha256`).
    """

    def __init__(self, path: Path, slots: list[TensorSlot], metadata: dict[str, str] | None = None):
        self.path = path
        self.slots = slots
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for slot in slots:
            header[slot.name] = {
                "dtype": _DTYPE_NAMES[slot.dtype][0],
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + slot.nbytes],
            }
            offset += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._hash = hashlib.sha256()
        self._file: BinaryIO = open(path, "wb")
        self._emit(struct.pack("<Q", len(raw)) + raw)
        self._slot = 0
        self._written = 0  # bytes of the current slot written so far
        self.nbytes = 8 + len(raw) + offset

    def _emit(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        self._file.write(data)

    def write(self, chunk: torch.Tensor) -> None:
        """Append the bytes of ``chunk`` (all or part of the current tensor, row-major)."""
        slot = self.slots[self._slot]
        if chunk.dtype != slot.dtype:
            raise ValueError(f"{self.path}: tensor {slot.name} is {slot.dtype}, got a {chunk.dtype} chunk")
        data = memoryview(chunk.contiguous().view(torch.uint8).numpy()).cast("B")
        if self._written + len(data) > slot.nbytes:
            raise ValueError(f"{self.path}: too many bytes for tensor {slot.name}")
        self._emit(data)
        self._written += len(data)
        if self._written == slot.nbytes:
            self._slot += 1
            self._written = 0
            # zero-sized tensors that follow need no bytes
            while self._slot < len(self.slots) and self.slots[self._slot].nbytes == 0:
                self._slot += 1

    def close(self) -> str:
        """Finish the file; returns its sha256. Fails if a declared tensor is incomplete."""
        self._file.close()
        while self._slot < len(self.slots) and self.slots[self._slot].nbytes == 0:
            self._slot += 1
        if self._slot != len(self.slots):
            raise ValueError(f"{self.path}: tensor {self.slots[self._slot].name} was not fully written")
        return self._hash.hexdigest()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()
