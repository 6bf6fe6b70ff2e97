"""The dense tower: bottom MLP -> interaction -> top MLP -> sigmoid, in plain PyTorch,
from ``dense.safetensors`` (torchrec DLRM state-dict keys). Ray-free.

It reproduces torchrec's ``DLRM`` / ``DLRM_DCN`` forward given the pooled embeddings::

    d = relu-MLP(dense)                              # [B, D]    dense_arch (ReLU after every layer)
    dot:   x = dot_interaction(d, sparse)            # [B, D + F(F+1)/2]
    dcnv2: x = dcn_cross(cat(d, sparse.flatten(1)))  # [B, D + F*D]
    logit = Linear(relu-MLP(x))                      # [B, 1]    over_arch (last layer linear)

The interaction runs on kernels/interaction.py (Triton winner on GPU, reference on CPU).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from kernels.interaction import DcnCross, dot_interaction
from recserve.package import Manifest, ModelPackage

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
    """The dense part of a package's model, on ``device``; ``forward`` takes pooled embeddings."""

    def __init__(self, manifest: Manifest, state: dict[str, torch.Tensor], *, device: str = "cpu",
                 backend: str = "auto"):
        super().__init__()
        w = manifest.workload
        self.interaction = w.interaction
        self.backend = backend
        self.device = torch.device(device)
        to = lambda t: torch.nn.Parameter(t.to(self.device, torch.float32), requires_grad=False)  # noqa: E731
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
                    parts.setdefault(m.group(1), {})[int(m.group(2))] = t.to(self.device, torch.float32)
            n = w.dcn_layers
            self.cross = DcnCross([parts["V_kernels"][i] for i in range(n)],
                                  [parts["W_kernels"][i] for i in range(n)],
                                  [parts["bias"][i] for i in range(n)], backend=backend)
        self.eval()
        self.warmup(len(w.features), w.embedding_dim, w.dense_features)

    @staticmethod
    def from_package(package: ModelPackage, *, device: str = "cpu", backend: str = "auto") -> TowerCore:
        return TowerCore(package.manifest, package.load_dense(), device=device, backend=backend)

    def warmup(self, num_sparse: int, D: int, dense_width: int) -> None:
        for B in (1, 8):
            self.forward(torch.zeros(B, dense_width), torch.zeros(B, num_sparse, D))

    @torch.no_grad()
    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """dense float32 [B, F_dense], sparse float32 [B, F, D] -> logits float32 [B]."""
        x = dense.to(self.device, torch.float32)
        for i in range(0, len(self.bottom), 2):
            x = F.relu(F.linear(x, self.bottom[i], self.bottom[i + 1]))  # [B, ...] -> [B, D]
        sparse = sparse.to(self.device, torch.float32)
        if self.interaction == "dot":
            x = dot_interaction(x, sparse, backend=self.backend)  # [B, D + F(F+1)/2]
        else:
            x = self.cross(torch.cat((x, sparse.flatten(1)), dim=1))  # [B, D + F*D]
        for i in range(0, len(self.top), 2):
            x = F.relu(F.linear(x, self.top[i], self.top[i + 1]))
        return F.linear(x, self.last[0], self.last[1]).squeeze(1)  # [B]

    def score(self, dense: np.ndarray | torch.Tensor, sparse: torch.Tensor) -> np.ndarray:
        """sigmoid(logit): float32 [B] on the host."""
        logits = self.forward(torch.as_tensor(dense), sparse)
        return torch.sigmoid(logits).cpu().numpy().astype(np.float32)
