"""Workload shapes for the search and the benchmark, read straight from the JSON specs
(kernels/ imports nothing else of the project): a bundled name (tiny, criteo-kaggle,
dlrmv2 from recserve/workload_specs/) or a path to such a file."""

from __future__ import annotations

import json
from pathlib import Path

SPEC_DIR = Path(__file__).resolve().parents[2] / "recserve" / "workload_specs"
KERNEL_SPEC_DIR = Path(__file__).resolve().parent / "specs"  # benchmark-only shapes (lookup-a)


class WorkloadSpecError(ValueError):
    """A workload file is missing or lacks a field; the message names it."""


def load_spec(workload: str | Path) -> dict:
    path = Path(workload)
    if not path.suffix:
        path = SPEC_DIR / f"{workload}.json"
        if not path.exists():
            path = KERNEL_SPEC_DIR / f"{workload}.json"
    if not path.exists():
        raise WorkloadSpecError(f"workload: no spec {str(workload)!r} (looked for {path})")
    return json.loads(path.read_text())


def load_tables(workload: str | Path) -> list[dict]:
    """[{name, rows, dim, pooling_factor}, ...] of a workload."""
    spec = load_spec(workload)
    tables = spec.get("tables")
    if not isinstance(tables, list) or not tables:
        raise WorkloadSpecError(f"workload {workload}: 'tables' must be a non-empty list")
    out = []
    for i, t in enumerate(tables):
        for key in ("rows", "dim", "pooling_factor"):
            if key not in t:
                raise WorkloadSpecError(f"workload {workload}: tables[{i}].{key} is missing")
        out.append({"name": t.get("name", f"t{i}"), "rows": int(t["rows"]), "dim": int(t["dim"]),
                    "pooling_factor": float(t["pooling_factor"])})
    return out
