"""Feature interaction for the dense tower: DLRM dot interaction and DCNv2 low-rank cross.

Dot interaction (matches torchrec ``InteractionArch`` exactly)::

    x      = cat(dense[:, None], sparse, dim=1)            # [B, F+1, D]
    gram   = x @ x^T                                       # [B, F+1, F+1]
    i, j   = torch.triu_indices(F+1, F+1, offset=1)        # pairs (i < j), row-major order
    out    = cat(dense, gram[:, i, j], dim=1)              # [B, D + F(F+1)/2]

The Triton kernel does the concat, the Gram matrix (tensor cores, fp32 accumulation) and the
upper-triangle gather in one pass: pair (i, j) lands at D + i(2N-i-1)/2 + (j-i-1), N = F+1.

DCNv2 low-rank cross (torchrec ``LowRankCrossNet``), per layer l::

    x_{l+1} = x0 * (W_l (V_l x_l) + b_l) + x_l     V_l: [r, N], W_l: [N, r], b_l: [N]

The Triton path keeps V_l x_l in cuBLAS (torch) and fuses the second product with the
bias, the multiply by x0 and the residual add (one pass over [B, N] instead of four).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.errors import BackendUnavailableError, KernelInputError
from kernels.registry import Choice, Winners, pow2_bucket

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

DOT_TEMPLATES = ("dot_tile",)
DOT_DEFAULT = {"SAMPLES": 1, "num_warps": 4, "num_stages": 2}
CROSS_TEMPLATES = ("cross_gemm",)
CROSS_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _winners(device: torch.device) -> Winners:
    return Winners.for_device(device)


def _check_backend(backend: str, device: torch.device) -> None:
    import os

    if backend not in ("auto", "triton", "reference"):
        raise KernelInputError(f"backend: must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError("backend='triton' needs a CUDA device or TRITON_INTERPRET=1")


def _pick(op: str, backend: str, device: torch.device, dtype: torch.dtype, bucket: str,
          template: str, default: dict) -> Choice:
    if backend == "reference":
        return Choice("reference")
    got = _winners(device).lookup(op, _DTYPE_NAMES[dtype], bucket) if device.type == "cuda" else Choice("reference")
    if backend == "triton" and got.backend != "triton":
        return Choice("triton", template, dict(default))
    return got


def _precision(x: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 products (torch does not use tf32 by default)."""
    return "ieee" if x.dtype == torch.float32 or x.device.type != "cuda" else "tf32"


def _upcast(x: torch.Tensor) -> bool:
    """Triton's CPU interpreter (3.9) computes bf16 tl.dot wrongly; upcast there only."""
    return x.device.type != "cuda" and x.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- dot interaction


def dot_interaction_reference(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """torchrec InteractionArch.forward, verbatim in plain torch."""
    num_sparse = sparse.shape[1]
    x = torch.cat((dense.unsqueeze(1), sparse), dim=1)  # [B, F+1, D]
    gram = torch.bmm(x, x.transpose(1, 2))  # [B, F+1, F+1]
    i, j = torch.triu_indices(num_sparse + 1, num_sparse + 1, offset=1, device=dense.device)
    return torch.cat((dense, gram[:, i, j]), dim=1)  # [B, D + F(F+1)/2]


@triton.jit(do_not_specialize=["B"])
def _dot_interaction_kernel(
    dense_ptr, sparse_ptr, out_ptr, B, F, D,
    s_dense_b, s_sparse_b, s_sparse_f, s_out_b,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SAMPLES: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    N = F + 1
    n = tl.arange(0, BLOCK_N)  # [BLOCK_N] vector index (0 = dense)
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    i = n[:, None]
    j = n[None, :]
    pair_pos = D + i * (2 * N - i - 1) // 2 + (j - i - 1)  # [BLOCK_N, BLOCK_N] output column
    pair_mask = (i < j) & (j < N)
    dmask = d < D
    smask = (n[:, None] >= 1) & (n[:, None] < N) & dmask[None, :]
    for s in tl.static_range(SAMPLES):
        b = (pid * SAMPLES + s).to(tl.int64)
        live_d = (d * 0 + b) < B  # [BLOCK_D] (vector masks: the interpreter wants no 0-d ones)
        x_dense = tl.load(dense_ptr + b * s_dense_b + d, mask=dmask & live_d, other=0.0)  # [BLOCK_D]
        x_sparse = tl.load(sparse_ptr + b * s_sparse_b + (n[:, None] - 1) * s_sparse_f + d[None, :],
                           mask=smask & live_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        x = tl.where(n[:, None] == 0, x_dense[None, :], x_sparse)  # [BLOCK_N, BLOCK_D]
        if UPCAST:
            x = x.to(tl.float32)
        gram = tl.dot(x, tl.trans(x), input_precision=PRECISION)  # [BLOCK_N, BLOCK_N] fp32
        out = out_ptr + b * s_out_b
        tl.store(out + d, x_dense, mask=dmask & live_d)
        tl.store(out + pair_pos, gram.to(out_ptr.dtype.element_ty), mask=pair_mask & ((j * 0 + b) < B))


def launch_dot_interaction(dense, sparse, out, *, template: str = "dot_tile", config: dict | None = None) -> None:
    cfg = dict(DOT_DEFAULT if config is None else config)
    if template not in DOT_TEMPLATES:
        raise KernelInputError(f"template: unknown interaction template {template!r}")
    B, num_sparse, D = sparse.shape
    samples = cfg["SAMPLES"]
    _dot_interaction_kernel[(triton.cdiv(B, samples),)](
        dense, sparse, out, B, num_sparse, D,
        dense.stride(0), sparse.stride(0), sparse.stride(1), out.stride(0),
        BLOCK_N=max(16, triton.next_power_of_2(num_sparse + 1)), BLOCK_D=max(16, triton.next_power_of_2(D)),
        SAMPLES=samples, PRECISION=_precision(dense), UPCAST=_upcast(dense),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def dot_bucket(B: int, num_sparse: int, D: int) -> str:
    return f"n{num_sparse + 1}_d{triton.next_power_of_2(D)}_b{pow2_bucket(B)}"


def dot_interaction(dense: torch.Tensor, sparse: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """dense [B, D], sparse [B, F, D] -> [B, D + F(F+1)/2] in the inputs' dtype.

    backend "auto": the searched winner on CUDA (reference where none beat it), the
    reference on CPU; "triton" forces the kernel; "reference" forces torch."""
    if dense.dim() != 2 or sparse.dim() != 3:
        raise KernelInputError(f"dense/sparse: need [B, D] and [B, F, D], got {tuple(dense.shape)} and {tuple(sparse.shape)}")
    B, D = dense.shape
    if sparse.shape[0] != B or sparse.shape[2] != D:
        raise KernelInputError(f"sparse: must be [{B}, F, {D}] to match dense, got {tuple(sparse.shape)}")
    if dense.dtype != sparse.dtype or dense.dtype not in _DTYPE_NAMES:
        raise KernelInputError(f"dense/sparse: need one float dtype, got {dense.dtype} and {sparse.dtype}")
    if dense.device != sparse.device:
        raise KernelInputError("dense/sparse: must be on one device")
    _check_backend(backend, dense.device)
    num_sparse = sparse.shape[1]
    if num_sparse == 0:
        return dense
    choice = _pick("interaction", backend, dense.device, dense.dtype, dot_bucket(B, num_sparse, D), "dot_tile", DOT_DEFAULT)
    if choice.backend != "triton":
        return dot_interaction_reference(dense, sparse)
    dense = dense if dense.stride(1) == 1 else dense.contiguous()
    sparse = sparse if sparse.stride(2) == 1 else sparse.contiguous()
    out = torch.empty(B, D + num_sparse * (num_sparse + 1) // 2, dtype=dense.dtype, device=dense.device)  # [B, D + F(F+1)/2]
    launch_dot_interaction(dense, sparse, out, template=choice.template, config=choice.config)
    return out


# ----------------------------------------------------------------------------- DCNv2 cross


def dcn_cross_reference(x0: torch.Tensor, V: Sequence[torch.Tensor], W: Sequence[torch.Tensor],
                        b: Sequence[torch.Tensor]) -> torch.Tensor:
    """torchrec LowRankCrossNet.forward: x_{l+1} = x0 * (W_l(V_l x_l) + b_l) + x_l."""
    x = x0
    for V_l, W_l, b_l in zip(V, W, b):
        x = x0 * (F.linear(F.linear(x, V_l), W_l) + b_l) + x  # [B, N]
    return x


@triton.jit
def _cross_gemm_kernel(
    xv_ptr, w_ptr, bias_ptr, x0_ptr, xl_ptr, out_ptr, M, N, K,
    s_xv_m, s_w_n, s_x_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out = x0 * (xv @ w^T + bias) + xl;  xv [M, K], w [N, K], x0/xl/out [M, N] (row stride s_x_m)."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    rk = tl.arange(0, BLOCK_K)
    a_ptr = xv_ptr + rm[:, None].to(tl.int64) * s_xv_m + rk[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptr = w_ptr + rn[None, :].to(tl.int64) * s_w_n + rk[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk < K - k * BLOCK_K
        a = tl.load(a_ptr, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(b_ptr, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    off = rm[:, None].to(tl.int64) * s_x_m + rn[None, :]
    bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + off, mask=mask, other=0.0).to(tl.float32)
    xl = tl.load(xl_ptr + off, mask=mask, other=0.0).to(tl.float32)
    out = x0 * (acc + bias[None, :]) + xl
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=mask)


def launch_cross_layer(x0, xl, xv, W_l, b_l, out, *, template: str = "cross_gemm", config: dict | None = None) -> None:
    cfg = dict(CROSS_DEFAULT if config is None else config)
    if template not in CROSS_TEMPLATES:
        raise KernelInputError(f"template: unknown dcn_cross template {template!r}")
    M, N = x0.shape
    K = xv.shape[1]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _cross_gemm_kernel[grid](
        xv, W_l, b_l, x0, xl, out, M, N, K, xv.stride(0), W_l.stride(0), x0.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        PRECISION=_precision(x0), UPCAST=_upcast(x0),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def cross_bucket(B: int, N: int, r: int) -> str:
    return f"n{triton.next_power_of_2(N)}_r{triton.next_power_of_2(r)}_b{pow2_bucket(B)}"


def dcn_cross(x0: torch.Tensor, V: Sequence[torch.Tensor], W: Sequence[torch.Tensor],
              b: Sequence[torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """DCNv2 low-rank cross layers. x0 [B, N]; per layer V [r, N], W [N, r], b [N].
    Returns [B, N] in x0's dtype. Backend selection as in :func:`dot_interaction`."""
    if x0.dim() != 2 or x0.dtype not in _DTYPE_NAMES:
        raise KernelInputError(f"x0: need a float [B, N] tensor, got {x0.dtype} {tuple(x0.shape)}")
    if not (len(V) == len(W) == len(b)):
        raise KernelInputError(f"V/W/b: need one of each per layer, got {len(V)}, {len(W)}, {len(b)}")
    B, N = x0.shape
    for l, (V_l, W_l, b_l) in enumerate(zip(V, W, b)):
        r = V_l.shape[0]
        if V_l.shape != (r, N) or W_l.shape != (N, r) or b_l.shape != (N,):
            raise KernelInputError(
                f"V[{l}]/W[{l}]/b[{l}]: need [r, {N}], [{N}, r], [{N}], got "
                f"{tuple(V_l.shape)}, {tuple(W_l.shape)}, {tuple(b_l.shape)}")
        if V_l.dtype != x0.dtype or W_l.dtype != x0.dtype or V_l.device != x0.device:
            raise KernelInputError(f"V[{l}]/W[{l}]: must match x0's dtype and device")
    _check_backend(backend, x0.device)
    if not V:
        return x0
    r = V[0].shape[0]
    choice = _pick("dcn_cross", backend, x0.device, x0.dtype, cross_bucket(B, N, r), "cross_gemm", CROSS_DEFAULT)
    if choice.backend != "triton":
        return dcn_cross_reference(x0, V, W, b)
    x0 = x0.contiguous()
    x = x0
    for V_l, W_l, b_l in zip(V, W, b):
        xv = F.linear(x, V_l).contiguous()  # [B, r]
        out = torch.empty_like(x0)  # [B, N]
        launch_cross_layer(x0, x, xv, W_l.contiguous(), b_l.contiguous(), out,
                           template=choice.template, config=choice.config)
        x = out
    return x


class DcnCross(torch.nn.Module):
    """LowRankCrossNet weights + :func:`dcn_cross` (the dense tower builds one per model)."""

    def __init__(self, V: Sequence[torch.Tensor], W: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
                 *, backend: str = "auto") -> None:
        super().__init__()
        self.V = torch.nn.ParameterList([torch.nn.Parameter(v, requires_grad=False) for v in V])
        self.W = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for w in W])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(x, requires_grad=False) for x in b])
        self.backend = backend

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, N]
        return dcn_cross(x0, list(self.V), list(self.W), list(self.b), backend=self.backend)
