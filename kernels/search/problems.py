"""What the search tunes: one operator at one (dtype, shape bucket), with its reference.
Each class here is a :class:`~kernels.search.types.SearchProblem`: gate inputs (small, seeded,
ragged and empty bags for lookups) on which a candidate must match the reference within
``tolerance``, the candidate's and the reference's outputs, and full-size timing inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import triton

from kernels import embedding_bag as eb
from kernels import interaction as ia
from kernels.quantize import FLOAT_DTYPES as _FLOAT
from kernels.quantize import weight_cols
from kernels.search.space import Candidate
from kernels.search.types import SearchProblem
from kernels.search.workloads import load_spec, load_tables


def _random_table(dtype: str, rows: int, dim: int, gen: torch.Generator, device) -> eb.TableWeights:
    if dtype in _FLOAT:
        w = torch.randn(rows, dim, generator=gen, device=device)
        return eb.TableWeights(w.to(_FLOAT[dtype]), dim, dtype)
    cols = weight_cols(dim, dtype)
    q = torch.randint(0, 256, (rows, cols), generator=gen, device=device, dtype=torch.uint8)
    scale = torch.rand(rows, generator=gen, device=device) * 0.02
    bias = torch.randn(rows, generator=gen, device=device) * 0.1
    return eb.TableWeights(q, dim, dtype, scale.float(), bias.float())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape:
        return math.inf
    if torch.isnan(out).any():
        return math.inf
    den = ref.double().norm().item()
    return (out.double() - ref.double()).norm().item() / max(den, 1e-30)


@dataclass
class EmbeddingBagProblem:
    """A shard's tables (rows, dims, pooling factors) at one storage dtype and batch."""

    dtype: str
    rows: Sequence[int]
    dims: Sequence[int]
    pooling: Sequence[float]
    batch: int
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    gate_rows_cap: int = 1000  # gate tables are small: correctness does not need big tables
    rows_cap: int = 2_000_000  # timing tables: far past the L2, small enough to build fast
    op: str = "embedding_bag"
    tolerance: float = 1e-5  # relative Frobenius error against the fp32 reference

    @property
    def bucket(self) -> str:
        return eb.shape_bucket(max(self.dims), self.batch, sum(self.pooling) / len(self.pooling))

    def normalize(self, cand: Candidate) -> Candidate:
        cfg = cand.cfg
        cfg["BLOCK_D"] = min(cfg["BLOCK_D"], max(16, triton.next_power_of_2(max(self.dims))))
        return Candidate.make(cand.template, cfg)

    def _batch(self, gen, lengths_fn, rows) -> tuple[torch.Tensor, torch.Tensor]:
        T, B = len(rows), self.batch
        lengths = torch.cat([lengths_fn(t) for t in range(T)])  # [T*B]
        ids = [torch.randint(0, rows[t], (int(lengths[t * B:(t + 1) * B].sum()),), generator=gen)
               for t in range(T)]
        indices = torch.cat(ids).to(self.device)  # [N]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(self.device)
        return indices, offsets

    def gate_inputs(self, seed: int) -> dict[str, Any]:
        """Ragged bags (0 .. 2x the pooling factor ids), a third of them empty; seed 0 makes
        one table's bags all empty."""
        gen = torch.Generator().manual_seed(seed)
        rows = [min(r, self.gate_rows_cap) for r in self.rows]
        tables = [_random_table(self.dtype, r, d, gen, "cpu") for r, d in zip(rows, self.dims)]
        B = self.batch

        def lengths(t):
            hi = max(2, int(2 * self.pooling[t]) + 1)
            out = torch.randint(0, hi, (B,), generator=gen)
            out[torch.rand(B, generator=gen) < 0.33] = 0
            if seed == 0 and t == 0:
                out[:] = 0
            return out

        indices, offsets = self._batch(gen, lengths, rows)
        tb = eb.TableBatchedEmbeddingBag(tables, device=self.device, backend="triton", warmup=False)
        return {"tb": tb, "indices": indices, "offsets": offsets}

    def timing_inputs(self) -> dict[str, Any]:
        """Tables at their workload rows (capped), every bag exactly round(pooling) ids."""
        gen = torch.Generator(device=self.device).manual_seed(1234)
        rows = [min(r, self.rows_cap) for r in self.rows]
        tables = [_random_table(self.dtype, r, d, gen, self.device) for r, d in zip(rows, self.dims)]
        cpu_gen = torch.Generator().manual_seed(99)
        indices, offsets = self._batch(
            cpu_gen, lambda t: torch.full((self.batch,), max(1, round(self.pooling[t])), dtype=torch.int64), rows)
        tb = eb.TableBatchedEmbeddingBag(tables, device=self.device, backend="triton", warmup=False)
        return {"tb": tb, "indices": indices, "offsets": offsets}

    def run(self, cand: Candidate, inputs: dict[str, Any], poison: bool = True) -> torch.Tensor:
        tb = inputs["tb"]
        out = torch.empty((self.batch, tb.total_dim), device=self.device)  # [B, sum dims]
        if poison:  # the gate: every element must be written
            out.fill_(float("nan"))
        for g in tb.groups:
            eb.launch(g, inputs["indices"], inputs["offsets"], None, out, self.batch, pooling="sum",
                      template=cand.template, config=cand.cfg)
        return out

    def reference(self, inputs: dict[str, Any]) -> torch.Tensor:
        return eb.embedding_bag_reference(inputs["tb"].tables, inputs["indices"], inputs["offsets"])

    def error(self, out, ref) -> float:
        return _rel_err(out, ref)


@dataclass
class DotProblem:
    dtype: str
    batch: int
    num_sparse: int  # F
    dim: int  # D
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    op: str = "interaction"

    @property
    def tolerance(self) -> float:
        return {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[self.dtype]

    @property
    def bucket(self) -> str:
        return ia.dot_bucket(self.batch, self.num_sparse, self.dim)

    def normalize(self, cand: Candidate) -> Candidate:
        return cand

    def gate_inputs(self, seed: int) -> dict[str, Any]:
        gen = torch.Generator(device=self.device).manual_seed(seed)  # made on the device: B may be 65536
        B = min(self.batch, 257) if seed % 2 else self.batch  # odd seeds: a ragged last block
        dense = torch.randn(B, self.dim, generator=gen, device=self.device).to(_FLOAT[self.dtype])
        sparse = torch.randn(B, self.num_sparse, self.dim, generator=gen, device=self.device).to(_FLOAT[self.dtype])
        return {"dense": dense, "sparse": sparse}

    def timing_inputs(self) -> dict[str, Any]:
        return self.gate_inputs(10_000 + 0)

    def run(self, cand: Candidate, inputs, poison: bool = True) -> torch.Tensor:
        dense, sparse = inputs["dense"], inputs["sparse"]
        B, num_sparse = sparse.shape[:2]
        out = torch.empty((B, self.dim + num_sparse * (num_sparse + 1) // 2), dtype=dense.dtype, device=self.device)
        if poison:
            out.fill_(float("nan"))
        ia.launch_dot_interaction(dense, sparse, out, template=cand.template, config=cand.cfg)
        return out

    def reference(self, inputs) -> torch.Tensor:
        return ia.dot_interaction_reference(inputs["dense"], inputs["sparse"])

    def error(self, out, ref) -> float:
        return _rel_err(out, ref)


@dataclass
class CrossProblem:
    dtype: str
    batch: int
    width: int  # N
    rank: int  # r
    layers: int
    device: torch.device = field(default_factory=lambda: torch.device("cuda"))
    op: str = "dcn_cross"

    @property
    def tolerance(self) -> float:
        return {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}[self.dtype]

    @property
    def bucket(self) -> str:
        return ia.cross_bucket(self.batch, self.width, self.rank)

    def normalize(self, cand: Candidate) -> Candidate:
        return cand

    def gate_inputs(self, seed: int) -> dict[str, Any]:
        gen = torch.Generator(device=self.device).manual_seed(seed)  # made on the device: B may be 65536
        N, r, dt = self.width, self.rank, _FLOAT[self.dtype]
        B = self.batch if seed % 2 == 0 else max(1, self.batch - 37)  # a ragged last tile
        mk = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=self.device) * scale).to(dt)  # noqa: E731
        return {"x0": mk(B, N), "V": [mk(r, N, scale=N**-0.5) for _ in range(self.layers)],
                "W": [mk(N, r, scale=r**-0.5) for _ in range(self.layers)],
                "b": [mk(N, scale=0.1) for _ in range(self.layers)]}

    def timing_inputs(self) -> dict[str, Any]:
        return self.gate_inputs(10_000)

    def run(self, cand: Candidate, inputs, poison: bool = True) -> torch.Tensor:
        x0 = inputs["x0"]
        x = x0
        for V, W, b in zip(inputs["V"], inputs["W"], inputs["b"]):
            xv = torch.nn.functional.linear(x, V)  # [B, r]
            out = torch.full_like(x0, float("nan")) if poison else torch.empty_like(x0)
            ia.launch_cross_layer(x0, x, xv, W, b, out, template=cand.template, config=cand.cfg)
            x = out
        return x

    def reference(self, inputs) -> torch.Tensor:
        return ia.dcn_cross_reference(inputs["x0"], inputs["V"], inputs["W"], inputs["b"])

    def error(self, out, ref) -> float:
        return _rel_err(out, ref)


def problems_for(op: str, workload: str, *, dtypes: Sequence[str], batches: Sequence[int],
                 device: torch.device) -> list[SearchProblem]:
    """The problems of one op for a workload spec (bundled name or path)."""
    spec = load_spec(workload)
    tables = load_tables(workload)
    out: list[SearchProblem] = []
    if op == "embedding_bag":
        for dtype in dtypes:
            for B in batches:
                out.append(EmbeddingBagProblem(dtype, [t["rows"] for t in tables], [t["dim"] for t in tables],
                                               [t["pooling_factor"] for t in tables], B, device=device))
    elif op == "interaction":
        dims = {t["dim"] for t in tables}
        if len(dims) != 1:
            raise ValueError(f"workload {workload}: interaction needs one embedding dim, got {sorted(dims)}")
        dim = dims.pop()
        float_dtypes = [d for d in dtypes if d in _FLOAT]
        dot = [DotProblem(dtype, B, len(tables), dim, device=device) for dtype in float_dtypes for B in batches]
        if spec.get("interaction") == "dcnv2":  # the workload's own interaction first
            width = (len(tables) + 1) * dim
            out += [CrossProblem(dtype, B, width, int(spec.get("dcn_low_rank", 512)), int(spec.get("dcn_layers", 3)),
                                 device=device) for dtype in float_dtypes for B in batches]
        out += dot
    else:
        raise ValueError(f"op: must be 'embedding_bag' or 'interaction', got {op!r}")
    return out
