"""DLRM dot interaction and DCNv2 cross layers: references against torchrec's modules, and
the Triton kernels against the references on awkward shapes and every float dtype."""

from __future__ import annotations

import pytest
import torch

from kernels.errors import KernelInputError
from kernels.interaction import (
    DcnCross,
    dcn_cross,
    dcn_cross_reference,
    dot_interaction,
    dot_interaction_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# relative Frobenius error allowed against a float64 reference
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_dot_reference_is_torchrec_interaction_arch():
    torchrec_dlrm = pytest.importorskip("torchrec.models.dlrm")
    gen = torch.Generator().manual_seed(0)
    B, F, D = 4, 5, 7
    dense, sparse = torch.randn(B, D, generator=gen), torch.randn(B, F, D, generator=gen)
    expect = torchrec_dlrm.InteractionArch(num_sparse_features=F)(dense, sparse)
    assert torch.equal(dot_interaction_reference(dense, sparse), expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, F, D", [(1, 1, 3), (3, 5, 8), (2, 26, 16), (5, 4, 20)])
def test_dot_kernel_matches_reference(device, dtype, B, F, D):
    gen = torch.Generator().manual_seed(B * 100 + F)
    dense = torch.randn(B, D, generator=gen).to(device=device, dtype=dtype)
    sparse = torch.randn(B, F, D, generator=gen).to(device=device, dtype=dtype)
    out = dot_interaction(dense, sparse, backend="triton")
    ref = dot_interaction_reference(dense.double(), sparse.double())
    assert out.shape == (B, D + F * (F + 1) // 2) and out.dtype == dtype
    assert _rel(out, ref) < REL[dtype]
    assert torch.equal(out[:, :D], dense)  # the dense part is copied, not recomputed


def test_dot_kernel_reads_strided_inputs(device):
    gen = torch.Generator().manual_seed(3)
    both = torch.randn(3, 6, 9, generator=gen).to(device)  # dense and sparse as views of one buffer
    dense, sparse = both[:, 0, :], both[:, 1:, :]
    out = dot_interaction(dense, sparse, backend="triton")
    assert _rel(out, dot_interaction_reference(dense.double(), sparse.double())) < 1e-6


def test_dot_rejects_mismatched_shapes_naming_the_field():
    with pytest.raises(KernelInputError, match="sparse"):
        dot_interaction(torch.zeros(2, 4), torch.zeros(2, 3, 5))
    with pytest.raises(KernelInputError, match="dense/sparse"):
        dot_interaction(torch.zeros(2, 4), torch.zeros(2, 3, 4, dtype=torch.float16))


def _cross_weights(N, r, layers, dtype, gen, device="cpu"):
    V = [(torch.randn(r, N, generator=gen) / N**0.5).to(device=device, dtype=dtype) for _ in range(layers)]
    W = [(torch.randn(N, r, generator=gen) / r**0.5).to(device=device, dtype=dtype) for _ in range(layers)]
    b = [torch.randn(N, generator=gen).to(device=device, dtype=dtype) for _ in range(layers)]
    return V, W, b


def test_dcn_reference_is_torchrec_low_rank_cross_net():
    crossnet = pytest.importorskip("torchrec.modules.crossnet")
    N, r, L = 10, 3, 3
    net = crossnet.LowRankCrossNet(in_features=N, num_layers=L, low_rank=r)
    with torch.no_grad():
        for p in net.bias:
            p.normal_()
    x0 = torch.randn(4, N, generator=torch.Generator().manual_seed(1))
    ref = dcn_cross_reference(x0, list(net.V_kernels), list(net.W_kernels), list(net.bias))
    torch.testing.assert_close(ref, net(x0), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, r, layers", [(1, 19, 6, 1), (5, 37, 16, 3), (70, 40, 8, 2)])
def test_dcn_kernel_matches_reference(device, dtype, B, N, r, layers):
    gen = torch.Generator().manual_seed(B + N)
    V, W, b = _cross_weights(N, r, layers, dtype, gen, device)
    x0 = torch.randn(B, N, generator=gen).to(device=device, dtype=dtype)
    out = DcnCross(V, W, b, backend="triton")(x0)
    ref = dcn_cross_reference(x0.double(), [v.double() for v in V], [w.double() for w in W], [x.double() for x in b])
    assert out.shape == (B, N) and out.dtype == dtype
    assert _rel(out, ref) < REL[dtype] * layers


def test_dcn_rejects_wrong_weight_shapes_naming_the_layer():
    V, W, b = _cross_weights(8, 2, 2, torch.float32, torch.Generator().manual_seed(0))
    W[1] = W[1].T
    with pytest.raises(KernelInputError, match=r"W\[1\]"):
        dcn_cross(torch.zeros(3, 8), V, W, b)


def test_auto_backend_on_cpu_runs_the_reference():
    gen = torch.Generator().manual_seed(5)
    dense, sparse = torch.randn(2, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    assert torch.equal(dot_interaction(dense, sparse, backend="auto"), dot_interaction_reference(dense, sparse))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4096])
def test_gpu_dot_kernel_at_dlrm_shape(B):
    gen = torch.Generator().manual_seed(6)
    dense = torch.randn(B, 128, generator=gen).half().cuda()
    sparse = torch.randn(B, 26, 128, generator=gen).half().cuda()
    out = dot_interaction(dense, sparse, backend="triton")
    assert _rel(out, dot_interaction_reference(dense.double(), sparse.double())) < 2e-3


@pytest.mark.gpu
def test_gpu_dcn_kernel_at_dlrmv2_shape():
    gen = torch.Generator().manual_seed(7)
    V, W, b = _cross_weights(3456, 512, 3, torch.float16, gen, "cuda")
    x0 = torch.randn(512, 3456, generator=gen).half().cuda()
    out = dcn_cross(x0, V, W, b, backend="triton")
    ref = dcn_cross_reference(x0.double(), [v.double() for v in V], [w.double() for w in W], [x.double() for x in b])
    assert _rel(out, ref) < 1e-2
