"""The dense tower: bottom MLP -> interaction -> top MLP -> sigmoid, in plain PyTorch,
from ``dense.safetensors`` (torchrec DLRM state-dict keys). Ray-free.

It reproduces torchrec's ``DLRM`` / ``DLRM_DCN`` forward given the pooled embeddings::

    d = relu-MLP(dense)                              # [B, D]    dense_arch (ReLU after every layer)
    dot:   x = dot_interaction(d, sparse)            # [B, D + F(F+1)/2]
    dcnv2: x = dcn_cross(cat(d, sparse.flatten(1)))  # [B, D + F*D]
    logit = Linear(relu-MLP(x))                      # [B, 1]    over_arch (last layer linear)

The interaction runs on kernels/interaction.py (Triton winner on GPU, reference on CPU).

On a GPU the tower runs as the shards do (serving/engine/shard.py): the batch is staged into pinned
buffers of its bucket (a power of two of examples; padded rows hold stale inputs and their
scores are dropped: every row is computed independently), one CUDA graph per bucket
captured at start replays dense -> sigmoid, and the scores come back through a pinned
buffer with one stream sync. Above the largest bucket it runs eagerly.

``dtype`` float16/bfloat16 runs the whole tower in that dtype (weights cast once; matmuls
accumulate in fp32; logits returned in fp32). Against the fp32 tower on the same inputs: scores differ by at most
LOWP_SCORE_BOUND[dtype] (tests/serving/test_tower_dtype.py checks it on the trained tiny
model: measured 2.9e-4 for float16 and 2.8e-3 for bfloat16 over 1,280 examples, CPU).
"""

from __future__ import annotations

import re
import threading

import numpy as np
import torch
import torch.nn.functional as F

from kernels.interaction import DcnCross, dot_interaction
from recserve.package import Manifest, ModelPackage
from serving.engine.buckets import Bucket, pick
from serving.engine.buckets import batch_buckets as _batch_sizes
from serving.config import DEFAULT_MAX_BATCH_SIZE
from serving.engine.graphs import GraphSet
from serving.engine.pooled import embedding_dtype, to_torch

# the largest |score(dtype) - score(fp32)| allowed on the same inputs (see the module docstring)
LOWP_SCORE_BOUND = {torch.float16: 1e-3, torch.bfloat16: 1e-2}

_BOTTOM = re.compile(r"dense_arch\.model\._mlp\.(\d+)\._linear\.(weight|bias)")
_TOP = re.compile(r"over_arch\.model\.0\._mlp\.(\d+)\._linear\.(weight|bias)")
_LAST = ("over_arch.model.1.weight", "over_arch.model.1.bias")
_CROSS = re.compile(r"inter_arch\.crossnet\.(W_kernels|V_kernels|bias)\.(\d+)")


def _layers(state: dict[str, torch.Tensor], pattern: re.Pattern) -> list[tuple[torch.Tensor, torch.Tensor]]:
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = pattern.fullmatch(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = t
    return [(found[i]["weight"], found[i]["bias"]) for i in sorted(found)]


class TowerCore(torch.nn.Module):
    """The dense part of a package's model, on ``device``; ``forward`` takes pooled embeddings.

    ``dtype``: the compute dtype (float32 default; float16/bfloat16 within
    LOWP_SCORE_BOUND). ``max_batch_size`` / ``batch_buckets``, ``graphs`` (default: on for
    CUDA) and ``pad`` (default: as ``graphs``) as in :class:`serving.engine.shard.ShardCore`.
    ``input_dtype``: the dtype pooled embeddings usually arrive in (its pinned staging buffer
    is made at start; any of float32/float16/bfloat16 is accepted). One score at a time (a
    lock guards the staging buffers and graphs).
    """

    def __init__(self, manifest: Manifest, state: dict[str, torch.Tensor], *, device: str = "cpu",
                 backend: str = "auto", dtype: torch.dtype | str = torch.float32,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_buckets: tuple[int, ...] | None = None,
                 graphs: bool | None = None, pad: bool | None = None,
                 input_dtype: torch.dtype | str = torch.float32):
        super().__init__()
        w = manifest.workload
        self.interaction = w.interaction
        self.backend = backend
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = embedding_dtype(dtype)
        to = lambda t: torch.nn.Parameter(t.to(self.device, self.dtype), requires_grad=False)  # noqa: E731
        self.bottom = torch.nn.ParameterList([to(t) for layer in _layers(state, _BOTTOM) for t in layer])
        self.top = torch.nn.ParameterList([to(t) for layer in _layers(state, _TOP) for t in layer])
        self.last = torch.nn.ParameterList([to(state[k]) for k in _LAST])
        if len(self.bottom) != 2 * len(w.bottom_mlp) or len(self.top) != 2 * (len(w.top_mlp) - 1):
            raise ValueError("dense.safetensors: layers do not match the workload's bottom_mlp/top_mlp")
        self.cross = None
        if self.interaction == "dcnv2":
            parts: dict[str, dict[int, torch.Tensor]] = {}
            for key, t in state.items():
                m = _CROSS.fullmatch(key)
                if m:
                    parts.setdefault(m.group(1), {})[int(m.group(2))] = t.to(self.device, self.dtype)
            n = w.dcn_layers
            self.cross = DcnCross([parts["V_kernels"][i] for i in range(n)],
                                  [parts["W_kernels"][i] for i in range(n)],
                                  [parts["bias"][i] for i in range(n)], backend=backend)
        self.eval()
        self.shape = (len(w.features), w.embedding_dim, w.dense_features)  # num_sparse, D, dense width
        self._lock = threading.Lock()
        self._h2d_done: torch.cuda.Event | None = None  # the last staging copies (pinned buffers reusable after)
        use_graphs = self.device.type == "cuda" if graphs is None else graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError("graphs=True needs a CUDA device")
        self.pad = use_graphs if pad is None else pad
        self.graphs = GraphSet(self.device) if use_graphs else None
        self.buckets: tuple[Bucket, ...] = ()
        if self.pad:
            self.buckets = tuple(Bucket(b, 0) for b in _batch_sizes(max_batch_size, batch_buckets))
            self._make_staging(self.buckets[-1].batch, embedding_dtype(input_dtype))
        self.warmup()

    @staticmethod
    def from_package(package: ModelPackage, **options) -> TowerCore:
        """Options as the constructor's (device, backend, dtype, max_batch_size, ...)."""
        return TowerCore(package.manifest, package.load_dense(), **options)

    def _make_staging(self, max_batch: int, input_dtype: torch.dtype) -> None:
        num_sparse, D, width = self.shape
        pin = self.device.type == "cuda"
        self._dense_h = torch.zeros(max_batch, width, pin_memory=pin)  # [B_max, F_dense] fp32
        self._sparse_h = {input_dtype: torch.zeros(max_batch, num_sparse, D, dtype=input_dtype, pin_memory=pin)}
        self._dense_d = self._dense_h.to(self.device) if pin else self._dense_h
        self._sparse_d = torch.zeros(max_batch, num_sparse, D, dtype=self.dtype, device=self.device)  # [B_max, F, D]
        if pin:
            self._scores_h = torch.zeros(max_batch, pin_memory=True)  # [B_max] fp32
            self._h2d_done = torch.cuda.Event()

    def warmup(self) -> None:
        """Kernels chosen and compiled, and (CUDA) every bucket's graph captured, now."""
        num_sparse, D, width = self.shape
        if not self.buckets:
            for B in (1, 8):
                self.forward(torch.zeros(B, width), torch.zeros(B, num_sparse, D))
            return
        for b in self.buckets:
            self._step(b)()
            if self.graphs is not None:
                self.graphs.capture(b, self._step(b))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, bucket: Bucket):
        B = bucket.batch
        return lambda: torch.sigmoid(self.forward(self._dense_d[:B], self._sparse_d[:B]))  # [B_b] fp32

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense float32 [B, F_dense], sparse [B, F, D] (float32/float16/bfloat16) -> logits float32 [B]."""
        x = dense.to(self.device, self.dtype)
        for i in range(0, len(self.bottom), 2):
            x = F.relu(F.linear(x, self.bottom[i], self.bottom[i + 1]))  # [B, ...] -> [B, D]
        sparse = sparse.to(self.device, self.dtype)
        if self.interaction == "dot":
            x = dot_interaction(x, sparse, backend=self.backend)  # [B, D + F(F+1)/2]
        else:
            x = self.cross(torch.cat((x, sparse.flatten(1)), dim=1))  # [B, D + F*D]
        for i in range(0, len(self.top), 2):
            x = F.relu(F.linear(x, self.top[i], self.top[i + 1]))
        return F.linear(x, self.last[0], self.last[1]).squeeze(1).float()  # [B]

    def stage(self, dense: np.ndarray | torch.Tensor, sparse: np.ndarray | torch.Tensor) -> Bucket | None:
        """Copies a batch into its bucket's staging buffers (H2D queued); None above every
        bucket. ``sparse`` on the device is copied device to device. Call with the lock held."""
        B = int(dense.shape[0])
        bucket = pick(self.buckets, B) if self.pad else None
        if bucket is None:
            return None
        sparse = to_torch(sparse)
        if self._h2d_done is not None:
            self._h2d_done.synchronize()  # the previous batch's copies out of the pinned buffers ran
        self._dense_h[:B] = torch.as_tensor(dense)
        if sparse.device.type == "cpu" and self.device.type == "cuda":
            pinned = self._sparse_h.get(sparse.dtype)
            if pinned is None:  # a dtype not announced at start: staged once, slower
                pinned = self._sparse_h[sparse.dtype] = torch.empty(
                    (self.buckets[-1].batch, *self.shape[:2]), dtype=sparse.dtype, pin_memory=True)
            pinned[:B].copy_(sparse)
            sparse = pinned[:B]
        self._sparse_d[:B].copy_(sparse, non_blocking=True)  # converts to the compute dtype
        if self._dense_d is not self._dense_h:
            self._dense_d[:B].copy_(self._dense_h[:B], non_blocking=True)
            self._h2d_done.record()
        return bucket

    def run_staged(self, bucket: Bucket) -> torch.Tensor:
        """Scores float32 [B_b] of a staged bucket on the device (valid until the next call)."""
        if self.graphs is not None and bucket in self.graphs:
            return self.graphs.replay(bucket)
        return self._step(bucket)()

    def score(self, dense: np.ndarray | torch.Tensor, sparse: np.ndarray | torch.Tensor) -> np.ndarray:
        """sigmoid(logit): float32 [B] on the host. sparse [B, F, D] in float32, float16 or
        bfloat16 (a tensor, or numpy with bfloat16 as uint16 bits)."""
        B = int(dense.shape[0])
        with self._lock:
            bucket = self.stage(dense, sparse)
            if bucket is None:
                return torch.sigmoid(self.forward(torch.as_tensor(dense), to_torch(sparse))).cpu().numpy()
            scores = self.run_staged(bucket)
            if self.device.type != "cuda":
                return scores[:B].numpy().copy()
            host = self._scores_h[:B]
            host.copy_(scores[:B], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy().copy()
