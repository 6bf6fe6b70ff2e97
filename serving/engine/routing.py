"""The router core: which shard looks up what, and how shard outputs become the tower's
sparse input. Pure numpy/torch over the plan; no Ray, no gRPC, no tables.

A shard's output has one *column* per (served feature, table slice on that shard), in the
shard's slice order. Example: tiny with ``t_item`` split over shards 0 and 1::

    shard 0 columns: user_id@t_user[0:1000)   item_id@t_item[0:2500)
    shard 1 columns: item_id@t_item[2500:5000) recent_items@t_hist[0:5000) category@t_cat[0:50)

    request: item_id ids [7, 4000] for example 0  ->  shard 0 gets [7], shard 1 gets [4000]
    tower input for item_id = shard-0 column 1 + shard-1 column 0   (sum pooling splits)

A :class:`ShardRequest` is the TBE layout of one shard's columns::

    lengths [C, B]   ids per (column, example)
    values  [N]      global ids, column-major then example order, N = lengths.sum()
    weights [N]      per-id weights, or None

The shard subtracts each column's ``row_start`` (the rebase) before its lookup.
"""

from __future__ import annotations

import importlib
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from recserve.batch import Batch
from recserve.package import Manifest

# pooled embeddings from the object store arrive as read-only arrays; they are only read here
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

FeatureFilter = Callable[[Batch], Batch]
"""A transformation of the decoded batch applied before the split (feature fading, issue 6).

It may replace features' bags with empty ones or drop features from ``batch.sparse``
(a feature absent after the filter is looked up as empty bags: zero pooled embedding, no
shard call for it). It must keep ``batch_size`` and ``dense`` shape."""


def identity_filter(batch: Batch) -> Batch:
    return batch


def load_feature_filter(path: str | None, manifest: Manifest) -> FeatureFilter:
    """The feature filter that ``path`` ('module:factory', see ``AppArgs.feature_filter``)
    makes for ``manifest``: ``factory(manifest)``; the identity for None, "" or "none"."""
    if path in (None, "", "none"):
        return identity_filter
    module, sep, factory = path.partition(":")
    if not sep or not module or not factory:
        raise ValueError(f"feature filter {path!r}: expected an import path 'module:factory'")
    return getattr(importlib.import_module(module), factory)(manifest)


REQUEST_ID: ContextVar[str] = ContextVar("recserve_request_id", default="")
"""The caller's request id (PredictRequest.request_id), set by both servers while a request is
handled, the feature filter included (e.g. fading's unit for requests without unit ids)."""


def observe_scores(feature_filter: FeatureFilter, batch: Batch, scores: np.ndarray, latency_s: float) -> None:
    """After scoring, hand the scores to a filter that defines ``observe(batch, scores,
    latency_s)`` (fading's guardrails); ``batch`` is what the filter returned."""
    observe = getattr(feature_filter, "observe", None)
    if observe is not None:
        observe(batch, scores, latency_s)


@dataclass(frozen=True, kw_only=True)
class Column:
    """One pooled output of a shard: ``feature`` looked up in rows [row_start, row_end) of ``table``."""

    feature: str
    feature_index: int  # position of the feature on the tower's F axis (model order)
    table: str
    row_start: int
    row_end: int
    dim: int

    def __str__(self) -> str:
        return f"{self.feature}@{self.table}[{self.row_start}:{self.row_end})"


@dataclass(frozen=True)
class ShardRequest:
    """One shard's lookups for a batch (see the module docstring for the layout)."""

    lengths: np.ndarray  # int32 [C, B]
    values: np.ndarray  # int32 or int64 [N] global ids
    weights: np.ndarray | None = None  # float32 [N]
    deadline: float | None = None  # time.time() after which the caller no longer wants the result
    version: str | None = None  # the model version that split it: a shard of another version refuses it

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[1])

    @property
    def num_ids(self) -> int:
        return int(self.values.shape[0])


def concat_requests(requests: list[ShardRequest]) -> ShardRequest:
    """Requests of one shard stacked along the batch axis (for dynamic batching)."""
    if len(requests) == 1:
        return requests[0]
    C = requests[0].lengths.shape[0]
    lengths = np.concatenate([r.lengths for r in requests], axis=1)  # [C, sum B]
    # values are column-major in each request: regroup column by column
    per_col = [np.split(r.values, np.cumsum(r.lengths.sum(axis=1))[:-1]) for r in requests]
    values = np.concatenate([per_col[i][c] for c in range(C) for i in range(len(requests))])  # [N]
    weights = None
    if any(r.weights is not None for r in requests):
        ws = [r.weights if r.weights is not None else np.ones(r.num_ids, np.float32) for r in requests]
        per_w = [np.split(w, np.cumsum(r.lengths.sum(axis=1))[:-1]) for w, r in zip(ws, requests)]
        weights = np.concatenate([per_w[i][c] for c in range(C) for i in range(len(requests))])
    return ShardRequest(lengths=lengths, values=values, weights=weights)


class Routing:
    """The plan as routing tables: columns per shard, split of a batch, assembly of outputs."""

    def __init__(self, manifest: Manifest):
        w = manifest.workload
        self.version = manifest.version
        self.features = w.features  # the tower's F axis: every model feature, model order
        self.dim = w.embedding_dim  # D
        served = set(manifest.served_features)
        index = {f: i for i, f in enumerate(self.features)}
        table_of = {t.name: t for t in w.tables}
        self.num_shards = manifest.plan.num_shards
        self.columns: dict[int, tuple[Column, ...]] = {}
        for sh in manifest.plan.shards:
            cols = []
            for s in sh.slices:
                for f in table_of[s.table].features:
                    if f in served:
                        cols.append(Column(feature=f, feature_index=index[f], table=s.table,
                                           row_start=s.row_start, row_end=s.row_end, dim=s.dim))
            self.columns[sh.index] = tuple(cols)
        # feature -> [(shard, column position, row_start, row_end)] in row order
        self._targets: dict[str, list[tuple[int, int, int, int]]] = {}
        for k, cols in self.columns.items():
            for c, col in enumerate(cols):
                self._targets.setdefault(col.feature, []).append((k, c, col.row_start, col.row_end))
        for targets in self._targets.values():
            targets.sort(key=lambda t: t[2])
        self._feature_index = {k: torch.tensor([c.feature_index for c in cols], dtype=torch.int64)
                               for k, cols in self.columns.items()}
        self._index_cache: dict[str, dict[int, torch.Tensor]] = {}
        self.id_dtype = np.int32 if max(t.rows for t in w.tables) < 2**31 else np.int64  # of ShardRequest.values

    def split(self, batch: Batch, *, deadline: float | None = None) -> dict[int, ShardRequest]:
        """Per-shard lookups for ``batch``; a shard with no ids in the batch is left out.

        ``deadline`` (time.time()) travels with each request, so a shard skips work that
        can no longer be used."""
        B = batch.batch_size
        # (shard, column) -> (values, lengths, weights)
        parts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        for feature, bags in batch.sparse.items():
            targets = self._targets.get(feature)
            if not targets or bags.values.size == 0:
                continue
            if len(targets) == 1:  # the whole table on one shard
                k, c, _, _ = targets[0]
                parts[(k, c)] = (bags.values, bags.lengths, bags.weights)
                continue
            example = np.repeat(np.arange(B), bags.lengths)  # [N] example of each id
            for k, c, lo, hi in targets:  # row-wise split: each id goes to the slice holding it
                mask = (bags.values >= lo) & (bags.values < hi)
                if not mask.any():
                    continue
                lengths = np.bincount(example[mask], minlength=B).astype(np.int32)  # [B]
                weights = None if bags.weights is None else bags.weights[mask]
                parts[(k, c)] = (bags.values[mask], lengths, weights)
        out: dict[int, ShardRequest] = {}
        for k, cols in self.columns.items():
            present = [c for c in range(len(cols)) if (k, c) in parts]
            if not present:
                continue
            lengths = np.zeros((len(cols), B), np.int32)  # [C, B]
            values, weights = [], []
            weighted = any(parts[(k, c)][2] is not None for c in present)
            for c in present:
                v, l, wt = parts[(k, c)]
                lengths[c] = l
                values.append(v)
                if weighted:
                    weights.append(wt if wt is not None else np.ones(v.size, np.float32))
            out[k] = ShardRequest(
                lengths=lengths,
                values=np.concatenate(values).astype(self.id_dtype, copy=False),
                weights=np.concatenate(weights).astype(np.float32, copy=False) if weighted else None,
                deadline=deadline,
                version=self.version,
            )
        return out

    def assemble(self, batch_size: int, outputs: dict[int, torch.Tensor | np.ndarray | None]) -> torch.Tensor:
        """Sum shard outputs into the tower's sparse input: float32 [B, F, D].

        A feature no shard returned (no ids, faded, dropped) stays zero: the pooled
        embedding of an empty bag. Slices of a row-split table add up to the whole.
        """
        parts = tuple(outputs.get(k) for k in range(self.num_shards))
        return self.assemble_many([(batch_size, parts)])

    def _feature_index_on(self, device) -> dict[int, torch.Tensor]:
        key = str(device)
        if key not in self._index_cache:
            self._index_cache[key] = {k: t.to(device) for k, t in self._feature_index.items()}
        return self._index_cache[key]

    def assemble_many(self, items: list[tuple[int, tuple]], *, device: torch.device | str = "cpu") -> torch.Tensor:
        """Several requests' shard outputs (``parts[k]``: shard k's [B_i, C_k * D] in any float
        dtype, or None) as one float32 [sum B_i, F, D] on ``device``, request after request.

        Each part moves to the device in its own (wire) dtype and is widened there."""
        total = sum(b for b, _ in items)
        sparse = torch.zeros(total, len(self.features), self.dim, device=device)  # [sum B, F, D]
        row = 0
        for batch_size, parts in items:
            for k, out in enumerate(parts):
                if out is None:
                    continue
                if isinstance(out, np.ndarray):  # read-only from the object store: only read here
                    out = torch.from_numpy(out)
                cols = self.columns[k]
                out = out.to(device, non_blocking=True).reshape(batch_size, len(cols), self.dim)  # [B, C, D]
                sparse[row:row + batch_size].index_add_(1, self._feature_index_on(device)[k], out.float())
            row += batch_size
        return sparse
