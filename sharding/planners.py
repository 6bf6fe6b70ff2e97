"""The planner: validate the inputs, partition with the chosen strategy, check the plan.

Example::

    >>> from sharding import TableSpec, plan
    >>> tables = [TableSpec(name="a", rows=10, dim=4), TableSpec(name="b", rows=6, dim=4)]
    >>> p = plan(tables, strategy="capacity", num_shards=2, shard_memory=140)
    >>> [[f"{s.table}[{s.row_start}:{s.row_end})" for s in sh.slices] for sh in p.shards]
    [['a[0:5)', 'b[0:3)'], ['a[5:10)', 'b[3:6)']]

(``a`` is 160 bytes, more than the 140-byte cap, so it is split into two row ranges; ``b``
then fits on neither shard whole and is split over the room that is left.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sharding.checks import check_plan
from sharding.partitioners import PARTITIONERS
from sharding.types import (
    STRATEGIES,
    PlannerError,
    PlannerErrorType,
    Shard,
    ShardPlan,
    TableSpec,
    row_bytes,
)


def plan(
    tables: Sequence[TableSpec],
    *,
    strategy: str,
    num_shards: int,
    shard_memory: int | None = None,
) -> ShardPlan:
    """Place ``tables`` on ``num_shards`` shards of at most ``shard_memory`` bytes each.

    Same inputs, same plan: every choice breaks ties by table name and shard index, and the
    assignment does not depend on the order of ``tables`` (only the order of slices within
    a shard does: model order). Raises :class:`PlannerError` with ``INVALID_INPUT`` for bad
    arguments and ``INSUFFICIENT_MEMORY`` when a table cannot be placed, naming the table,
    its size and the room left.
    """
    dtype = _validate(tables, strategy=strategy, num_shards=num_shards, shard_memory=shard_memory)
    partitioner = PARTITIONERS[strategy]()
    partitioner.validate(num_shards=num_shards, shard_memory=shard_memory)
    per_shard = partitioner.partition(tables, num_shards=num_shards, shard_memory=shard_memory)
    result = ShardPlan(
        strategy=strategy,  # type: ignore[arg-type]  # checked by _validate
        dtype=dtype,  # type: ignore[arg-type]
        shard_memory=shard_memory,
        shards=tuple(Shard(index=i, slices=tuple(s)) for i, s in enumerate(per_shard)),
    )
    check_plan(result, tables)
    return result


def _validate(
    tables: Sequence[TableSpec], *, strategy: str, num_shards: int, shard_memory: int | None
) -> str:
    """Check the arguments every strategy shares; return the plan's dtype."""

    def invalid(message: str, **details: object) -> PlannerError:
        return PlannerError(message, PlannerErrorType.INVALID_INPUT, dict(details))

    if strategy not in STRATEGIES:
        raise invalid(f"strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}", strategy=strategy)
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise invalid(f"num_shards: must be an integer >= 1, got {num_shards!r}", num_shards=num_shards)
    if shard_memory is not None and (
        not isinstance(shard_memory, int) or isinstance(shard_memory, bool) or shard_memory <= 0
    ):
        raise invalid(f"shard_memory: must be a positive number of bytes, got {shard_memory!r}",
                      shard_memory=shard_memory)
    if not tables:
        raise invalid("tables: nothing to plan (no tables given)")
    names = [t.name for t in tables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise invalid(f"tables: duplicate table name(s) {duplicates}", tables=duplicates)
    dtypes = sorted({t.dtype for t in tables})
    if len(dtypes) != 1:
        raise invalid(f"tables: all tables of a plan must share one dtype, got {dtypes}", dtypes=dtypes)
    if shard_memory is not None:
        for t in sorted(tables, key=lambda t: t.name):
            per_row = row_bytes(t.dim, t.dtype)
            if per_row > shard_memory:
                raise PlannerError(
                    f"table {t.name!r}: one row takes {per_row} bytes ({t.dim} x {t.dtype}), more "
                    f"than shard_memory ({shard_memory} bytes); no shard can hold any of it",
                    PlannerErrorType.INSUFFICIENT_MEMORY,
                    {"table": t.name, "row_bytes": per_row, "shard_memory": shard_memory},
                )
    return dtypes[0]


def first_plan_that_fits(tables: Sequence[TableSpec], *, strategy: str, counts: Sequence[int],
                         shard_memory: Callable[[int], int]) -> ShardPlan:
    """The plan for the first shard count of ``counts`` whose tables fit ``shard_memory(count)``
    bytes a shard (the GPU and host planners). When none fits, the last count's PlannerError
    (INSUFFICIENT_MEMORY, naming the table); any other PlannerError at once."""
    error: PlannerError | None = None
    for n in counts:
        try:
            return plan(tables, strategy=strategy, num_shards=n, shard_memory=shard_memory(n))
        except PlannerError as e:
            if e.error_type is not PlannerErrorType.INSUFFICIENT_MEMORY:
                raise
            error = e
    assert error is not None, "counts: empty"
    raise error


def plan_within_budget(tables: Sequence[TableSpec], *, strategy: str, counts: Sequence[int],
                       shard_memory: Callable[[int], int], replicas: int, capacity: int,
                       over_budget: Callable[[PlannerError, Sequence[int], int], PlannerError]) -> ShardPlan:
    """:func:`first_plan_that_fits` over a device budget (the GPUs', the hosts'): when the tables x
    ``replicas`` exceed ``capacity`` bytes no count can fit, and only the first is tried (its error
    names the table); when none fits, ``over_budget(error, counts tried, tables' bytes)`` is
    raised: the error in the budget's own terms."""
    total = sum(t.bytes for t in tables)
    if total * replicas > capacity:
        counts = counts[:1]
    try:
        return first_plan_that_fits(tables, strategy=strategy, counts=counts, shard_memory=shard_memory)
    except PlannerError as e:
        if e.error_type is not PlannerErrorType.INSUFFICIENT_MEMORY:
            raise
        raise over_budget(e, counts, total) from None
