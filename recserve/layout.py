"""The state-dict layout of a workload's torchrec model, without importing torchrec: the
key and shape of every tensor of ``DLRM`` (dot) and ``DLRM_DCN`` (dcnv2).

Export checks a trained state dict against it, random initialization writes it, and the
package's ``dense.safetensors`` uses its dense keys. ``tests/recserve/test_layout.py``
checks it against the torchrec model itself for every bundled workload.

For a workload with F sparse features of dim D and bottom MLP ending in D::

    sparse_arch.embedding_bag_collection.embedding_bags.<table>.weight   [rows, D]
    dense_arch.model._mlp.<i>._linear.{weight,bias}                      bottom MLP
    inter_arch.crossnet.{W_kernels,V_kernels,bias}.<l>                   dcnv2 only
    over_arch.model.0._mlp.<i>._linear.{weight,bias}                     top MLP but the last layer
    over_arch.model.1.{weight,bias}                                      last layer (the logit)

The top MLP's input is D + F(F+1)/2 wide (dot: the dense vector and the pairwise dot
products of the F+1 vectors) or D(F+1) wide (dcnv2: the concatenated vectors).
"""

from __future__ import annotations

from recserve.workloads import WorkloadConfig

# State-dict key of a table's weights in a torchrec DLRM; everything else is dense.
EMBEDDING_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags."


def embedding_key(table: str) -> str:
    return f"{EMBEDDING_PREFIX}{table}.weight"


def interaction_width(workload: WorkloadConfig) -> int:
    """Width of the top MLP's input."""
    f, d = len(workload.features), workload.embedding_dim
    return d + f * (f + 1) // 2 if workload.interaction == "dot" else d * (f + 1)


def _linear(prefix: str, fan_in: int, fan_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (fan_out, fan_in), f"{prefix}.bias": (fan_out,)}


def dense_shapes(workload: WorkloadConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every dense tensor, in torchrec's state-dict order."""
    out: dict[str, tuple[int, ...]] = {}
    width = workload.dense_features
    for i, size in enumerate(workload.bottom_mlp):
        out |= _linear(f"dense_arch.model._mlp.{i}._linear", width, size)
        width = size
    width = interaction_width(workload)
    if workload.interaction == "dcnv2":
        n, rank = workload.dcn_layers, workload.dcn_low_rank
        out |= {f"inter_arch.crossnet.W_kernels.{i}": (width, rank) for i in range(n)}
        out |= {f"inter_arch.crossnet.V_kernels.{i}": (rank, width) for i in range(n)}
        out |= {f"inter_arch.crossnet.bias.{i}": (width,) for i in range(n)}
    for i, size in enumerate(workload.top_mlp[:-1]):
        out |= _linear(f"over_arch.model.0._mlp.{i}._linear", width, size)
        width = size
    out |= _linear("over_arch.model.1", width, workload.top_mlp[-1])
    return out


def state_dict_shapes(workload: WorkloadConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the torchrec model: the tables, then the dense part."""
    tables = {embedding_key(t.name): (t.rows, t.dim) for t in workload.tables}
    return tables | dense_shapes(workload)
