"""RMSNorm of Llama-family models, one launch on CUDA.

PyTorch's composition (upcast, square, mean, add, rsqrt, multiply, downcast, scale) is eight kernels; in a
blended prefill's sparse layers, which are short of GPU work, each launch's host cost (~20 us on the H100
machine) shows in the time to first token. Computed like transformers: normalised in float32, cast to the
model's dtype, then scaled by the weight.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x, weight, out, hidden, row_stride, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        values = tl.load(x + row.to(tl.int64) * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(values * values, axis=0) / hidden + eps)
        normalised = (values * scale).to(out.dtype.element_ty)
        w = tl.load(weight + cols, mask=inside)
        tl.store(out + row.to(tl.int64) * hidden + cols, (w * normalised).to(out.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] -> the same shape; fused on CUDA."""
    if triton is None or not x.is_cuda or x.dim() != 2 or x.stride(-1) != 1 or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps)
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](x, weight, out, hidden, x.stride(0), eps, BLOCK=block,
                                  num_warps=8 if block >= 2048 else 4)
    return out
