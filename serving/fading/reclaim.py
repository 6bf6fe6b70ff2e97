"""Reclaiming capacity: what dropping fully faded features frees on each shard.

A feature is reclaimable once its schedule is done at coverage 0 (the last step soaked);
every request already serves it as an empty bag, so dropping its tables changes no score.
A table can go when every feature that reads it is reclaimable (or already dropped).
:func:`reclaim_report` works that out from the fading state and a package's manifest and
prints the ``recserve export --drop-features`` line that rebuilds the package without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from recserve.package import Manifest


@dataclass(frozen=True, kw_only=True)
class ReclaimReport:
    model: str
    reclaimable: tuple[str, ...]  # features done at coverage 0
    not_yet: tuple[str, ...]  # faded features not reclaimable yet ("feature (status, coverage)")
    tables: tuple[str, ...]  # tables that can be dropped
    shard_bytes: dict[int, tuple[int, int]]  # shard -> (bytes now, bytes freed)
    lookups_per_example: float  # embedding ids per example no longer looked up
    replanned: tuple[int, ...] = ()  # bytes per shard of a fresh plan without the tables

    @property
    def bytes_freed(self) -> int:
        return sum(freed for _, freed in self.shard_bytes.values())

    @property
    def drop_features(self) -> tuple[str, ...]:
        return self.reclaimable

    def __str__(self) -> str:
        lines = [f"model {self.model}: reclaimable features: {', '.join(self.reclaimable) or '(none)'}"]
        if self.not_yet:
            lines.append(f"  not yet (schedule not done at coverage 0): {', '.join(self.not_yet)}")
        if not self.reclaimable:
            return "\n".join(lines)
        lines.append(f"  tables dropped: {', '.join(self.tables) or '(none: a table is shared with a live feature)'}")
        lines.append(f"  {'shard':>5} {'bytes now':>16} {'bytes freed':>16} {'freed':>7}")
        for k, (now, freed) in sorted(self.shard_bytes.items()):
            pct = 100.0 * freed / now if now else 0.0
            lines.append(f"  {k:>5} {now:>16,} {freed:>16,} {pct:>6.1f}%")
        total_now = sum(n for n, _ in self.shard_bytes.values())
        pct = 100.0 * self.bytes_freed / total_now if total_now else 0.0
        lines.append(f"  {'all':>5} {total_now:>16,} {self.bytes_freed:>16,} {pct:>6.1f}%")
        lines.append(f"  lookups saved: {self.lookups_per_example:g} ids per example")
        if self.replanned:
            before = max(n for n, _ in self.shard_bytes.values())
            lines.append(
                f"  re-planned with the same strategy and shard count: largest shard {before:,} -> "
                f"{max(self.replanned):,} bytes (per shard: {', '.join(f'{b:,}' for b in self.replanned)})"
            )
        return "\n".join(lines)


def reclaim_report(manifest: Manifest, states) -> ReclaimReport:
    """``states``: the FeatureStates of ``manifest``'s model (from the store or Status)."""
    w = manifest.workload
    served = set(manifest.served_features)
    done = tuple(s.feature for s in states if s.reclaimable and s.feature in served)
    not_yet = tuple(
        f"{s.feature} ({s.status.value}, coverage {s.coverage:g})"
        for s in states
        if not s.reclaimable and s.feature in served and (s.coverage < 1.0 or s.status.value != "manual")
    )
    gone = set(done) | set(manifest.dropped_features)
    kept = {t.name for t in w.tables_without(gone)}
    tables = tuple(t.name for t in w.tables if t.name in manifest.plan.tables and t.name not in kept)
    shard_bytes = {}
    for sh in manifest.plan.shards:
        now = sum(s.bytes for s in sh.slices)  # bytes in the plan's storage dtype
        freed = sum(s.bytes for s in sh.slices if s.table in tables)
        shard_bytes[sh.index] = (now, freed)
    lookups = sum(w.table_of(f).pooling_factor for f in done)
    replanned: tuple[int, ...] = ()
    if tables:
        replanned = _replan(manifest, set(manifest.plan.tables) - set(tables))
    return ReclaimReport(
        model=manifest.name,
        reclaimable=done,
        not_yet=not_yet,
        tables=tables,
        shard_bytes=shard_bytes,
        lookups_per_example=lookups,
        replanned=replanned,
    )


def _replan(manifest: Manifest, kept: set[str]) -> tuple[int, ...]:
    """Bytes per shard of the plan ``recserve export --drop-features`` would make."""
    from recserve.planning import table_specs
    from sharding import PlannerError, plan

    p = manifest.plan
    specs = [s for s in table_specs(manifest.workload, p.dtype) if s.name in kept]
    if not specs:
        return ()
    try:
        new = plan(specs, strategy=p.strategy, num_shards=p.num_shards, shard_memory=p.shard_memory)
    except (PlannerError, ValueError):
        return ()
    return tuple(sh.bytes for sh in new.shards)
