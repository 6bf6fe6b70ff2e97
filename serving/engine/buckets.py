"""Batch buckets for captured GPU work: the shapes a shard or the tower captures CUDA graphs
for at replica start, and the choice of the bucket a request is padded to.

A graph replays fixed shapes, so a request of ``B`` examples and ``N`` ids runs in the
smallest captured bucket ``(batch >= B, ids >= N)``: its bags are padded with empty bags
(lengths 0) up to ``batch``, and its ids are followed by stale ids up to ``ids``, which no
bag covers (the lookup reads only ids before the last offset). A request above every
bucket runs eagerly at its own shape: bucketing never fails a request.

Buckets are powers of two (and the maximum batch itself), so padding at most doubles the
work of a request; ids buckets of each batch bucket span the id counts requests of that
size are expected to have, from the shard's mean ids per example::

    max_batch=8, ids_per_example=3, spread=2:
    batch 1: ids 2, 4, 8     batch 2: ids 4, 8, 16    batch 4: ids 8, 16, 32
    batch 8: ids 16, 32, 64
"""

from __future__ import annotations

from dataclasses import dataclass


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclass(frozen=True, order=True)
class Bucket:
    """One captured shape: ``batch`` examples (bags per column) and room for ``ids`` ids."""

    batch: int  # B_b examples
    ids: int  # N_b ids (0 for work without ids, e.g. the tower)

    def fits(self, batch: int, ids: int) -> bool:
        return batch <= self.batch and ids <= self.ids


def batch_buckets(max_batch: int, sizes: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The batch sizes to capture: ``sizes`` if given, else 1, 2, 4, ... up to ``max_batch``
    (``max_batch`` itself included when it is not a power of two)."""
    if max_batch < 1:
        raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
    if sizes is not None:
        if not sizes or any(int(s) < 1 for s in sizes):
            raise ValueError(f"batch buckets: need positive sizes, got {sizes!r}")
        return tuple(sorted({int(s) for s in sizes}))
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return tuple(out)


def id_buckets(batch: int, ids_per_example: float, *, spread: int = 4) -> tuple[int, ...]:
    """Powers of two covering requests of ``batch // 2 + 1 .. batch`` examples whose mean ids
    per example is within a factor ``spread`` of ``ids_per_example``."""
    if ids_per_example <= 0:
        return (next_pow2(batch),)
    lo = next_pow2(max(1, int((batch // 2 + 1) * ids_per_example / spread)))
    hi = next_pow2(max(1, int(batch * ids_per_example * spread)))
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return tuple(out)


def shard_buckets(max_batch: int, ids_per_example: float, *, sizes: tuple[int, ...] | None = None,
                  spread: int = 4) -> tuple[Bucket, ...]:
    """Every (batch, ids) bucket a shard captures, smallest first."""
    return tuple(sorted(Bucket(b, n) for b in batch_buckets(max_batch, sizes)
                        for n in id_buckets(b, ids_per_example, spread=spread)))


def pick(buckets: tuple[Bucket, ...], batch: int, ids: int = 0) -> Bucket | None:
    """The smallest bucket (by padded work: batch first, then ids) that fits; None above all."""
    for b in buckets:  # sorted
        if b.fits(batch, ids):
            return b
    return None
