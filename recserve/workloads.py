"""Workloads: the reference model shapes and traffic shapes that training, export,
planning, tests, load tests and benchmarks share.

A workload is a JSON file (the bundled ones live in ``recserve/workload_specs``) parsed
into frozen, validated configs. Unknown keys, missing fields and impossible sizes are
rejected with a :class:`WorkloadError` that names the field.

Example::

    >>> w = load_workload("tiny")
    >>> [t.name for t in w.tables]
    ['t_user', 't_item', 't_hist', 't_cat']
    >>> w.features
    ('user_id', 'item_id', 'recent_items', 'category')
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

Interaction = Literal["dot", "dcnv2"]
IdDistribution = Literal["zipf", "uniform"]

BUNDLED = ("tiny", "criteo-kaggle", "dlrmv2")


class WorkloadError(ValueError):
    """A workload file or config is invalid; the message names the field."""


@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """One embedding table and the sparse features that look it up."""

    name: str
    features: tuple[str, ...]  # sparse feature names that read this table
    rows: int  # number of embeddings
    dim: int  # embedding width
    pooling_factor: float  # mean ids per bag (per example, per feature)

    def __post_init__(self) -> None:
        where = f"tables[{self.name!r}]"
        if not self.name or not isinstance(self.name, str):
            raise WorkloadError("tables[].name: must be a non-empty string")
        if not self.features:
            raise WorkloadError(f"{where}.features: must list at least one feature")
        for field in ("rows", "dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise WorkloadError(f"{where}.{field}: must be a positive integer, got {value!r}")
        if not isinstance(self.pooling_factor, (int, float)) or self.pooling_factor <= 0:
            raise WorkloadError(
                f"{where}.pooling_factor: must be positive, got {self.pooling_factor!r}"
            )


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """A model architecture plus the shape of its traffic."""

    name: str
    description: str = ""
    dense_features: int  # width of the dense feature vector
    interaction: Interaction
    bottom_mlp: tuple[int, ...]  # dense arch layer sizes; last = embedding dim for "dot"
    top_mlp: tuple[int, ...]  # over arch layer sizes; last must be 1 (the logit)
    tables: tuple[TableConfig, ...]
    dcn_layers: int | None = None  # DCNv2 cross layers ("dcnv2" only)
    dcn_low_rank: int | None = None  # DCNv2 low-rank dim ("dcnv2" only)
    ids: IdDistribution = "uniform"  # how ids are drawn within a table
    zipf_alpha: float = 1.05  # exponent when ids == "zipf"
    samples_per_request: tuple[int, int] = (1, 64)  # inclusive range of batch sizes

    def __post_init__(self) -> None:
        if not isinstance(self.dense_features, int) or self.dense_features <= 0:
            raise WorkloadError(f"dense_features: must be a positive integer, got {self.dense_features!r}")
        if self.interaction not in ("dot", "dcnv2"):
            raise WorkloadError(f"interaction: must be 'dot' or 'dcnv2', got {self.interaction!r}")
        for field in ("bottom_mlp", "top_mlp"):
            sizes = getattr(self, field)
            if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes):
                raise WorkloadError(f"{field}: must be a non-empty list of positive integers, got {list(sizes)!r}")
        if self.top_mlp[-1] != 1:
            raise WorkloadError(f"top_mlp: last layer must be 1 (the logit), got {self.top_mlp[-1]}")
        if not self.tables:
            raise WorkloadError("tables: must list at least one table")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise WorkloadError(f"tables: duplicate table name in {names}")
        features = [f for t in self.tables for f in t.features]
        if len(set(features)) != len(features):
            raise WorkloadError(f"tables[].features: a feature is listed twice in {features}")
        dims = {t.dim for t in self.tables}
        if self.interaction == "dot":
            if len(dims) != 1:
                raise WorkloadError(f"tables[].dim: dot interaction needs one embedding dim, got {sorted(dims)}")
            (dim,) = dims
            if self.bottom_mlp[-1] != dim:
                raise WorkloadError(
                    f"bottom_mlp: last layer ({self.bottom_mlp[-1]}) must equal the embedding "
                    f"dim ({dim}) for dot interaction"
                )
            if self.dcn_layers is not None or self.dcn_low_rank is not None:
                raise WorkloadError("dcn_layers/dcn_low_rank: only valid with interaction 'dcnv2'")
        else:
            if len(dims) != 1 or self.bottom_mlp[-1] != next(iter(dims)):
                raise WorkloadError(
                    f"bottom_mlp: last layer ({self.bottom_mlp[-1]}) must equal the embedding "
                    f"dim ({sorted(dims)}) for dcnv2 interaction"
                )
            for field in ("dcn_layers", "dcn_low_rank"):
                value = getattr(self, field)
                if not isinstance(value, int) or value <= 0:
                    raise WorkloadError(f"{field}: must be a positive integer for dcnv2, got {value!r}")
        if self.ids not in ("zipf", "uniform"):
            raise WorkloadError(f"ids: must be 'zipf' or 'uniform', got {self.ids!r}")
        if not isinstance(self.zipf_alpha, (int, float)) or self.zipf_alpha <= 0:
            raise WorkloadError(f"zipf_alpha: must be positive, got {self.zipf_alpha!r}")
        lo, hi = self.samples_per_request
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
            raise WorkloadError(
                f"samples_per_request: must be [lo, hi] with 0 < lo <= hi, got {list(self.samples_per_request)!r}"
            )

    @property
    def features(self) -> tuple[str, ...]:
        """Sparse feature names in model order."""
        return tuple(f for t in self.tables for f in t.features)

    @property
    def embedding_dim(self) -> int:
        return self.tables[0].dim

    def table_of(self, feature: str) -> TableConfig:
        for t in self.tables:
            if feature in t.features:
                return t
        raise WorkloadError(f"unknown sparse feature {feature!r}")

    def tables_without(self, dropped_features: Iterable[str]) -> tuple[TableConfig, ...]:
        """The tables still read once ``dropped_features`` are gone: a table is left out
        only when every feature that reads it is dropped."""
        dropped = set(dropped_features)
        return tuple(t for t in self.tables if not set(t.features) <= dropped)

    def with_max_rows(self, max_rows: int | None) -> WorkloadConfig:
        """The same workload with every table capped at ``max_rows`` rows."""
        if max_rows is None:
            return self
        if max_rows <= 0:
            raise WorkloadError(f"max_rows: must be positive, got {max_rows}")
        tables = tuple(dataclasses.replace(t, rows=min(t.rows, max_rows)) for t in self.tables)
        return dataclasses.replace(self, tables=tables)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["tables"] = [dict(dataclasses.asdict(t), features=list(t.features)) for t in self.tables]
        for key in ("bottom_mlp", "top_mlp", "samples_per_request"):
            out[key] = list(out[key])
        return {k: v for k, v in out.items() if v is not None}


_TABLE_KEYS = {f.name for f in dataclasses.fields(TableConfig)}
_WORKLOAD_KEYS = {f.name for f in dataclasses.fields(WorkloadConfig)}
_REQUIRED_TABLE = {"name", "features", "rows", "dim", "pooling_factor"}
_REQUIRED_WORKLOAD = {"dense_features", "interaction", "bottom_mlp", "top_mlp", "tables"}


def _table_from_json(i: int, raw: Any) -> TableConfig:
    if not isinstance(raw, dict):
        raise WorkloadError(f"tables[{i}]: must be an object")
    unknown = set(raw) - _TABLE_KEYS
    if unknown:
        raise WorkloadError(f"tables[{i}]: unknown key(s) {sorted(unknown)}")
    missing = _REQUIRED_TABLE - set(raw)
    if missing:
        raise WorkloadError(f"tables[{i}]: missing field(s) {sorted(missing)}")
    features = raw["features"]
    if not isinstance(features, list) or not all(isinstance(f, str) and f for f in features):
        raise WorkloadError(f"tables[{i}].features: must be a list of non-empty strings")
    return TableConfig(**dict(raw, features=tuple(features)))


def workload_from_json(raw: Any, *, name: str) -> WorkloadConfig:
    """Parse a workload object (as read from JSON) into a validated config."""
    if not isinstance(raw, dict):
        raise WorkloadError(f"workload {name!r}: must be a JSON object")
    raw = dict(raw)
    raw.setdefault("name", name)
    unknown = set(raw) - _WORKLOAD_KEYS
    if unknown:
        raise WorkloadError(f"workload {name!r}: unknown key(s) {sorted(unknown)}")
    missing = _REQUIRED_WORKLOAD - set(raw)
    if missing:
        raise WorkloadError(f"workload {name!r}: missing field(s) {sorted(missing)}")
    if not isinstance(raw["tables"], list):
        raise WorkloadError("tables: must be a list")
    raw["tables"] = tuple(_table_from_json(i, t) for i, t in enumerate(raw["tables"]))
    for key in ("bottom_mlp", "top_mlp", "samples_per_request"):
        if key in raw:
            if not isinstance(raw[key], list):
                raise WorkloadError(f"{key}: must be a list")
            raw[key] = tuple(raw[key])
    if len(raw.get("samples_per_request", (1, 1))) != 2:
        raise WorkloadError("samples_per_request: must be [lo, hi]")
    return WorkloadConfig(**raw)


def load_workload(name_or_path: str | Path) -> WorkloadConfig:
    """A bundled workload by name (``tiny``, ``criteo-kaggle``, ``dlrmv2``) or a JSON file."""
    text: str
    if str(name_or_path) in BUNDLED:
        name = str(name_or_path)
        text = resources.files("recserve").joinpath(f"workload_specs/{name}.json").read_text()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise WorkloadError(
                f"workload {str(name_or_path)!r}: not a bundled name ({', '.join(BUNDLED)}) "
                "and no such file"
            )
        name = path.stem
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkloadError(f"workload {name!r}: invalid JSON: {e}") from None
    return workload_from_json(raw, name=name)
