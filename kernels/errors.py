"""Typed errors raised by the kernels package. Each message names the offending field."""

from __future__ import annotations


class KernelInputError(ValueError):
    """An input to a kernel launcher has the wrong shape, dtype, device or value."""


class IndexOutOfRangeError(KernelInputError):
    """An embedding id is negative or >= the rows of its table (checked before launch)."""

    def __init__(self, *, table: int, index: int, rows: int, position: int) -> None:
        self.table = table
        self.index = index
        self.rows = rows
        self.position = position
        super().__init__(
            f"indices[{position}]: id {index} is out of range for table {table} "
            f"(rows={rows})"
        )


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (e.g. Triton on a CPU tensor without
    TRITON_INTERPRET=1)."""
