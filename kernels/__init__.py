"""recserve kernels: Triton lookup and interaction kernels, their torch references, and the
search that picks their launch configs per device. Imports nothing else of the project."""

from kernels.embedding_bag import TableBatchedEmbeddingBag, TableWeights, embedding_bag_reference
from kernels.errors import BackendUnavailableError, IndexOutOfRangeError, KernelInputError

__all__ = [
    "BackendUnavailableError",
    "IndexOutOfRangeError",
    "KernelInputError",
    "TableBatchedEmbeddingBag",
    "TableWeights",
    "embedding_bag_reference",
]
