"""A teacher package scored in this process: the scoring step the teacher job's actors run
(``serving.teacher``), without Ray or pyarrow, for experiments and for timing on a GPU."""

from __future__ import annotations

import numpy as np

from recserve.batch import Batch


def ranker_logits(ranker, spec, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's logits float32 [B] and pooled embeddings float32 [B, F, D] of a batch: the
    package's shards and tower in this process (``LocalRanker``), as the job's actors score."""
    import torch

    from serving.api.codec import validate

    sparse = {f: (x.values, x.lengths, x.weights) for f, x in batch.sparse.items()}
    checked = validate(spec, batch.batch_size, batch.dense, sparse, batch.unit_ids)  # ids within the teacher's tables
    outputs = {k: ranker.shards[k].lookup(req) for k, req in ranker.routing.split(checked).items()}
    pooled = ranker.routing.assemble(checked.batch_size, outputs)  # [B, F, D]
    with torch.no_grad():
        logits = ranker.tower.forward(torch.as_tensor(checked.dense), pooled)  # [B]
    return logits.float().cpu().numpy(), pooled.cpu().numpy()


class InProcessTeacher:
    """A teacher package scored in this process, without Ray: the scoring loop of experiments,
    and the reference the Ray Data job's scores are tested against."""

    def __init__(self, package: str, device: str = "cpu"):
        from recserve.package import ModelPackage
        from serving.api.codec import ModelSpec
        from serving.engine.local_ranker import LocalRanker

        pkg = ModelPackage.open(package)
        self.ranker = LocalRanker.load(pkg, device=device)
        self.manifest = pkg.manifest
        self.spec = ModelSpec.of(self.manifest, max_batch_size=2**31 - 1)

    def logits(self, batch: Batch) -> np.ndarray:
        """Teacher logits float32 [B]."""
        return ranker_logits(self.ranker, self.spec, batch)[0]
