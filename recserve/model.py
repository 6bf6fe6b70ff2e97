"""The torchrec model of a workload: the offline reference that export reads and that
serving must reproduce score for score.

``build_model`` follows torchrec's own construction (EmbeddingBagCollection with sum
pooling, then ``DLRM`` for dot interaction or ``DLRM_DCN`` for DCNv2).
"""

from __future__ import annotations

import numpy as np
import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recserve.batch import Batch
from recserve.workloads import WorkloadConfig


def table_configs(workload: WorkloadConfig, *, data_type: DataType = DataType.FP32) -> list[EmbeddingBagConfig]:
    """torchrec's config of every table of ``workload`` (sum pooling)."""
    return [
        EmbeddingBagConfig(
            name=t.name,
            feature_names=list(t.features),
            embedding_dim=t.dim,
            num_embeddings=t.rows,
            pooling=PoolingType.SUM,
            data_type=data_type,
        )
        for t in workload.tables
    ]


def build_model(
    workload: WorkloadConfig, *, device: str | torch.device = "cpu", weighted: bool = False
) -> DLRM:
    """The torchrec DLRM (dot) or DLRM_DCN (dcnv2) for ``workload``.

    ``weighted=True`` makes the embedding bags use per-id weights from the input
    (the parameters are the same, so a state dict loads into either).
    """
    ebc = EmbeddingBagCollection(tables=table_configs(workload), is_weighted=weighted, device=torch.device(device))
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=workload.dense_features,
        dense_arch_layer_sizes=list(workload.bottom_mlp),
        over_arch_layer_sizes=list(workload.top_mlp),
        dense_device=torch.device(device),
    )
    if workload.interaction == "dot":
        return DLRM(**common)
    return DLRM_DCN(**common, dcn_num_layers=workload.dcn_layers, dcn_low_rank_dim=workload.dcn_low_rank)


def to_kjt(batch: Batch, features: tuple[str, ...], *, weighted: bool = False) -> KeyedJaggedTensor:
    """The batch's sparse features as a KeyedJaggedTensor in model feature order.

    With ``weighted=True`` every feature carries weights (1.0 where the batch has none).
    Missing features are sent as empty bags.
    """
    values, lengths, weights = [], [], []
    for f in features:
        bags = batch.sparse.get(f)
        if bags is None:
            values.append(np.zeros(0, np.int64))
            lengths.append(np.zeros(batch.batch_size, np.int32))
            weights.append(np.zeros(0, np.float32))
            continue
        values.append(bags.values.astype(np.int64, copy=False))
        lengths.append(bags.lengths.astype(np.int32, copy=False))
        w = bags.weights if bags.weights is not None else np.ones(len(bags.values), np.float32)
        weights.append(w.astype(np.float32, copy=False))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(features),
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
        weights=torch.from_numpy(np.concatenate(weights)) if weighted else None,
    )


@torch.no_grad()
def predict(model: torch.nn.Module, batch: Batch, features: tuple[str, ...]) -> np.ndarray:
    """sigmoid(model logit) for every example: float32 [B]."""
    weighted = bool(getattr(model.sparse_arch.embedding_bag_collection, "_is_weighted", False))
    kjt = to_kjt(batch, features, weighted=weighted)
    logits = model(dense_features=torch.from_numpy(batch.dense), sparse_features=kjt)  # [B, 1]
    return torch.sigmoid(logits).squeeze(1).numpy().astype(np.float32)
