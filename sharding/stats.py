"""A plan as a table for people: per-shard bytes, fill, cost and tables, then balance.

Example (``recserve plan --workload tiny --strategy load --shards 2``)::

    plan: strategy=load  shards=2  dtype=fp32  shard_memory=none
    shard            bytes         MiB   fill       cost  tables
        0           81,600        0.08      -      256.0  t_hist[0:2500) t_cat
        1          272,000        0.26      -      224.0  t_user t_item t_hist[2500:5000)
    bytes: max 272,000  mean 176,800  max/mean 1.538
    cost:  max 256.0  mean 240.0  max/mean 1.067
    cost = estimated bytes of embedding rows read per request (pooling factor x dim x bytes
    per element x request rate); split tables carry cost in proportion to their rows.
"""

from __future__ import annotations

import textwrap

from sharding.types import ShardPlan, TableSlice

COST_NOTE = (
    "cost = estimated bytes of embedding rows read per request (pooling factor x dim x bytes\n"
    "per element x request rate); split tables carry cost in proportion to their rows."
)


def slice_label(s: TableSlice) -> str:
    """``name`` for a whole table, ``name[start:end)`` for a row range."""
    return s.table if s.is_whole else f"{s.table}[{s.row_start}:{s.row_end})"


def plan_report(plan: ShardPlan, *, width: int = 110) -> str:
    """Per-shard table plus max/mean of bytes and cost, as printed by ``recserve plan``."""
    cap = plan.shard_memory
    lines = [
        f"plan: strategy={plan.strategy}  shards={plan.num_shards}  dtype={plan.dtype}  "
        f"shard_memory={f'{cap:,} bytes ({cap / 2**30:.2f} GiB)' if cap else 'none'}"
    ]
    head = f"{'shard':>5}  {'bytes':>15}  {'MiB':>10}  {'fill':>5}  {'cost':>9}  "
    lines.append(head + "tables")
    for sh in plan.shards:
        fill = f"{100 * sh.bytes / cap:4.0f}%" if cap else "    -"
        row = f"{sh.index:>5}  {sh.bytes:>15,}  {sh.bytes / 2**20:>10.2f}  {fill:>5}  {sh.cost:>9.1f}  "
        names = " ".join(slice_label(s) for s in sh.slices) or "(empty)"
        wrapped = textwrap.wrap(names, width=max(20, width - len(row))) or [names]
        lines.append(row + wrapped[0])
        lines.extend(" " * len(row) + more for more in wrapped[1:])
    bal = plan.balance()
    lines.append(
        f"bytes: max {bal['max_bytes']:,.0f}  mean {bal['mean_bytes']:,.0f}  "
        f"max/mean {bal['bytes_max_over_mean']:.3f}"
    )
    lines.append(
        f"cost:  max {bal['max_cost']:,.1f}  mean {bal['mean_cost']:,.1f}  "
        f"max/mean {bal['cost_max_over_mean']:.3f}"
    )
    lines.append(COST_NOTE)
    return "\n".join(lines)
