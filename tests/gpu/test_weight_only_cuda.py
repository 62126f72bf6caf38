"""kernels/weight_only.py on the GPU: the int8 and int4 weight-only Triton products against the reference
(the weight dequantised, cuBLAS's product) at the probe's shapes, each launch configuration, float16 and
bfloat16 rows, and a product replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from blendgate.kernels import weight_only

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,n,k", [(64, 6144, 4096), (64, 4096, 14336), (37, 1536, 576), (1, 576, 1536),
                                      (96, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_kernel_equals_the_reference(bits, rows, n, k, dtype) -> None:
    w = torch.randn(n, k, device="cuda") * 0.02
    q = weight_only.quantize_int8(w) if bits == 8 else weight_only.quantize_int4(w)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    residual = torch.randn(rows, n, device="cuda", dtype=dtype)
    expected = (x.float() @ q.dequantize().t() + residual.float())
    for config in (weight_only.LaunchConfig(), weight_only.LaunchConfig(block_n=32, split_k=1),
                   weight_only.LaunchConfig(block_n=128, warps=8, stages=3)):
        got = weight_only.weight_only_linear(x, q, residual=residual, config=config)
        assert got.dtype == dtype and got.shape == (rows, n)
        assert relative_error(got, expected) < 5e-3


def test_a_product_replays_from_a_cuda_graph() -> None:
    q = weight_only.quantize_int4(torch.randn(4096, 4096, device="cuda") * 0.02)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    eager = weight_only.weight_only_linear(x, q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        weight_only.weight_only_linear(x, q)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = weight_only.weight_only_linear(x, q)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, weight_only.weight_only_linear(x, q), rtol=0, atol=0)
    assert not torch.equal(out, eager)
