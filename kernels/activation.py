"""SwiGLU's activation: silu(gate) * up, from the fused gate-and-up projection, one launch on CUDA.

The MLP projects gate and up in one matrix product (their weights stacked), so each row holds gate then up.
PyTorch would take a slice, a silu and a multiply (two launches and a round trip of the intermediate through
memory); this reads each row once and writes the product once. Rounded like transformers: silu(gate) in the
model's dtype, then the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * inter] -> [rows, inter]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(gate_up, out, inter, row_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < inter
        gate = tl.load(gate_up + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * row_stride + inter + cols, mask=inside, other=0.0)
        activated = (gate * tl.sigmoid(gate)).to(up.dtype)
        tl.store(out + row * inter + cols, (activated.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=inside)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """As `silu_and_mul_reference`, fused on CUDA."""
    if triton is None or not gate_up.is_cuda or gate_up.dim() != 2 or gate_up.stride(-1) != 1:
        return silu_and_mul_reference(gate_up)
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), BLOCK=block)
    return out
