"""The torchrec model a package stands for, and how far a stored model's scores may be from
the fp32 model's: references for tests that serve exported packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kernels.quantize import QUANTIZED, dequantize, error_bound
from recserve.batch import Batch
from recserve.layout import embedding_key
from recserve.model import build_model, predict, to_kjt
from recserve.package import ModelPackage


def package_tables(package: str | Path) -> dict[str, torch.Tensor]:
    """Every table of a package as the fp32 values it stores ([rows, dim]; dequantized)."""
    pkg = ModelPackage.open(package)
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for sh in pkg.manifest.plan.shards:
        for s in pkg.load_shard(sh.index):
            w = dequantize(s.weight, s.scale, s.bias, s.dtype, s.dim) if s.dtype in QUANTIZED else s.weight.float()
            parts.setdefault(s.table, []).append((s.row_start, w))
    return {t: torch.cat([w for _, w in sorted(p, key=lambda x: x[0])]) for t, p in parts.items()}


def torchrec_model_of(package: str | Path) -> torch.nn.Module:
    """The torchrec DLRM whose weights are exactly what ``package`` stores."""
    pkg = ModelPackage.open(package)
    state = dict(pkg.load_dense())
    state |= {embedding_key(t): w for t, w in package_tables(package).items()}
    model = build_model(pkg.manifest.workload)
    model.load_state_dict(state)
    return model.eval()


def torchrec_scores(package: str | Path, batch: Batch) -> np.ndarray:
    pkg = ModelPackage.open(package)
    return predict(torchrec_model_of(package), batch, pkg.manifest.workload.features)


def storage_score_bound(model: torch.nn.Module, features: tuple[str, ...], batch: Batch, dtype: str) -> np.ndarray:
    """Per example, how far storing ``model``'s tables as ``dtype`` may move its score: the
    per-element storage error bound (:func:`kernels.quantize.error_bound`) propagated to
    first order, sum over tables of |d score / d W| * bound(W), doubled as a margin for the
    higher-order terms. float64 [B]."""
    ebc = model.sparse_arch.embedding_bag_collection
    bounds = {name: error_bound(bag.weight.detach(), dtype) for name, bag in ebc.embedding_bags.items()}
    kjt = to_kjt(batch, features)
    scores = torch.sigmoid(model(dense_features=torch.from_numpy(batch.dense), sparse_features=kjt)).squeeze(1)  # [B]
    out = np.zeros(batch.batch_size)
    for b in range(batch.batch_size):
        model.zero_grad()
        scores[b].backward(retain_graph=True)
        out[b] = sum(float((bag.weight.grad.abs() * bounds[name]).sum()) for name, bag in ebc.embedding_bags.items())
    model.zero_grad()
    return 2 * out
