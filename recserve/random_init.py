"""A model package with seeded random weights, for any workload and storage dtype, without
training and without torchrec: how a GPU host builds DLRMv2 at full size itself
(``recserve export --init random``).

The weights, as torchrec and torch initialize a new model (fp32; each storage dtype then
stores them exactly as an export of a trained model would)::

    table of R rows          U(-1/sqrt(R), 1/sqrt(R))             torchrec EmbeddingBagConfig's default
    Linear weight, ReLU      U(-sqrt(6/fan_in), sqrt(6/fan_in))   He (Kaiming) uniform, gain sqrt(2)
    last Linear (the logit)  U(-sqrt(3/fan_in), sqrt(3/fan_in))   He uniform, gain 1 (no ReLU after it)
    Linear bias              U(-1/sqrt(fan_in), 1/sqrt(fan_in))   torch.nn.Linear's default
    DCNv2 W and V kernels    N(0, 2 / (fan_in + fan_out))         torchrec LowRankCrossNet (Xavier normal)
    DCNv2 biases             0

He rather than torch's default for the MLP weights (which shrinks the signal by ~3x per
layer): the scores of traffic from ``recserve.synth`` then spread around 0.5 (standard
deviation 0.03-0.07 on tiny, criteo-kaggle and dlrmv2) instead of collapsing onto one value.

Table rows are drawn in blocks of :func:`block_rows` rows; block ``j`` of table ``t`` comes
from its own generator seeded by ``(seed, t, j)``, so a row's values depend only on the
seed, the table (its name and rows) and the generating device, never on the plan, the
storage dtype or the number of threads: the fp32, fp16 and int8 packages of one seed are
one model stored three ways. Blocks are generated in parallel, on the CPU (numpy's PCG64)
or, with ``gen_device="cuda"``, on the GPU (torch's Philox), which also converts and
quantizes them before copying the bytes back.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch

from recserve.export import ExportResult, write_package
from recserve.layout import dense_shapes
from recserve.workloads import WorkloadConfig
from sharding.types import ShardPlan

BLOCK_BYTES = 32 << 20  # fp32 bytes of rows drawn by one generator
LOGIT_WEIGHT = "over_arch.model.1.weight"  # the last Linear: no ReLU after it


def block_rows(dim: int) -> int:
    return max(1, BLOCK_BYTES // (4 * dim))


def _block_seed(seed: int, table: str, block: int) -> int:
    """A 63-bit seed for block ``block`` of ``table``."""
    state = np.random.SeedSequence([seed, zlib.crc32(table.encode()), block]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class RandomRows:
    """Rows of every table of ``workload``, drawn block by block (a RowSource for export)."""

    def __init__(self, workload: WorkloadConfig, seed: int, device: str = "cpu"):
        self.tables = {t.name: t for t in workload.tables}
        self.seed = seed
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--gen-device cuda: no CUDA device is available")

    def block_rows(self, table: str) -> int:
        return block_rows(self.tables[table].dim)

    def rows(self, table: str, start: int, end: int) -> torch.Tensor:
        t = self.tables[table]
        per = block_rows(t.dim)
        j = start // per
        if (end - 1) // per != j:
            raise ValueError(f"rows [{start}, {end}) of {table} span more than block {j}")
        n = min(per, t.rows - j * per)  # rows of block j
        bound = 1.0 / math.sqrt(t.rows)
        seed = _block_seed(self.seed, table, j)
        if self.device.type == "cuda":
            g = torch.Generator(device=self.device).manual_seed(seed)
            block = torch.rand(n, t.dim, generator=g, device=self.device)  # [n, dim] in [0, 1)
        else:
            u = np.random.Generator(np.random.PCG64(seed)).random(n * t.dim, dtype=np.float32)  # [n * dim]
            block = torch.from_numpy(u).view(n, t.dim)
        block.mul_(2 * bound).sub_(bound)  # U(-bound, bound)
        return block[start - j * per : end - j * per]

    def release(self, rows: torch.Tensor) -> None:
        pass


def random_dense(workload: WorkloadConfig, seed: int) -> dict[str, torch.Tensor]:
    """The dense tensors (torchrec keys, fp32), initialized as the module docstring says."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = dense_shapes(workload)
    for key, shape in shapes.items():
        if key.startswith("inter_arch.crossnet.bias"):
            out[key] = torch.zeros(shape)
        elif key.startswith("inter_arch.crossnet."):  # W_kernels, V_kernels: Xavier normal
            std = math.sqrt(2.0 / (shape[0] + shape[1]))
            out[key] = torch.randn(shape, generator=g) * std
        elif key.endswith(".bias"):  # [out]
            bound = 1.0 / math.sqrt(shapes[key[: -len("bias")] + "weight"][1])
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=g)
        else:  # a Linear's weight [out, in]
            gain = 1.0 if key == LOGIT_WEIGHT else math.sqrt(2.0)
            bound = gain * math.sqrt(3.0 / shape[1])
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=g)
    return out


def export_random_package(
    workload: WorkloadConfig, out: str | Path, *, plan: ShardPlan, seed: int = 0, gen_device: str = "cpu", **options
) -> ExportResult:
    """Write a package of ``workload`` with seeded random weights, sharded by ``plan``;
    ``options`` are :func:`recserve.export.write_package`'s. The model is named
    ``<workload>-random`` unless ``options`` name it."""
    options["name"] = options.get("name") or f"{workload.name}-random"
    return write_package(workload, out, plan=plan, dense=random_dense(workload, seed),
                         source=RandomRows(workload, seed, gen_device), **options)
