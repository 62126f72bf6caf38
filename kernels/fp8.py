"""FP8 (e4m3) matrix products for weight-bound passes: weights quantised once, activations per row.

A pass of a few dozen rows through a layer (blending's probe pass, chunkcache/probe.py) is bound by reading
the weights: at bf16 the H200's four products of a Llama-3-8B layer run at HBM bandwidth. Weights in e4m3
halve the bytes read. Scales follow the "rowwise" recipe of PyTorch's `torch._scaled_mm` (and of vLLM's and
SGLang's per-channel FP8 linears): one float32 scale per output channel of the weight, amax / 448 (e4m3's
largest finite value), and one per row of the activations, computed on the fly.

- `quantize_weight(w [N, K]) -> Fp8Weight`: once per weight.
- `quantize_rows(x [M, K]) -> (x_fp8 [M, K], scale [M, 1] float32)`: per-row dynamic quantisation, one Triton
  launch on CUDA (`quantize_rows_reference` is the same rounding in PyTorch, and serves elsewhere).
- `fp8_linear(x, weight, bias, residual)`: x @ w.t() (+ bias) (+ residual) in x's dtype. On CUDA at compute
  capability 8.9 or later (`hardware_fp8`), `torch._scaled_mm` with row-wise scales; elsewhere an emulation
  with the same rounding (x and w quantised then dequantised, the product in x's dtype), so a float32 model on
  the CPU shows what FP8 does to a result. No host synchronisation: capturable in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
# Scales never fall below this, so an all-zero row or channel quantises to zeros instead of dividing by zero.
SCALE_FLOOR = 1e-12
# torch._scaled_mm needs both matrix dimensions it reads (K, and N of the weight) in multiples of 16.
_ALIGNMENT = 16


@dataclass(frozen=True)
class Fp8Weight:
    """A linear layer's weight in e4m3 with one float32 scale per output channel: w ~= values * scale[:, None].
    Connects `quantize_weight` (once per model) and `fp8_linear` (each product).

    values: [N, K] float8_e4m3fn, row-major (so values.t() is the column-major second operand _scaled_mm wants).
    scale: [1, N] float32 (the row-wise scale_b of torch._scaled_mm)."""

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in `dtype`: the weight as the FP8 product sees it."""
        return (self.values.float() * self.scale.t()).to(dtype)


def quantize_weight(w: torch.Tensor) -> Fp8Weight:
    """w [N, K] (any float dtype) -> Fp8Weight: per output row, scale = max(amax / 448, SCALE_FLOOR) and
    values = round-to-nearest-even(w / scale) in e4m3 (|values| <= 448 by construction)."""
    if w.dim() != 2:
        raise ValueError(f"a weight to quantise is [out_features, in_features], got shape {tuple(w.shape)}")
    values, scale = quantize_rows_reference(w)
    return Fp8Weight(values=values.contiguous(), scale=scale.reshape(1, -1).contiguous())


def quantize_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], scale [M, 1] float32): per row, scale = max(amax / 448, SCALE_FLOOR) and the
    values x / scale rounded to nearest even, clamped to +-448 (e4m3fn has no infinity)."""
    wide = x.float()
    scale = (wide.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(SCALE_FLOOR)
    return (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x, out, scales, width, row_stride, floor, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        values = tl.load(x + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(values), axis=0) / 448.0, floor)
        scaled = tl.minimum(tl.maximum(values / scale, -448.0), 448.0)
        tl.store(out + row * width + cols, scaled.to(out.dtype.element_ty), mask=inside)
        tl.store(scales + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `quantize_rows_reference`, one launch on CUDA GPUs with e4m3 (hardware_fp8; out [M, K] contiguous)."""
    if triton is None or x.dim() != 2 or x.stride(-1) != 1 or not hardware_fp8(x.device, torch.bfloat16):
        return quantize_rows_reference(x)
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=FP8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(width)
        _quantize_rows_kernel[(rows,)](x, out, scales, width, x.stride(0), SCALE_FLOOR, BLOCK=block,
                                       num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)
    return out, scales


def hardware_fp8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FP8 products run on the hardware for activations of `dtype` on `device`: CUDA at compute
    capability 8.9 (Ada) or later, and a half-precision dtype (float16 or bfloat16)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.t() (+ bias [N]) (+ residual [M, N]) -> [M, N] in x's dtype, x quantised per row.

    Hardware path (hardware_fp8, K and N multiples of 16): torch._scaled_mm(x_fp8 [M, K] row-major,
    w_fp8.t() [K, N] column-major, scale_a [M, 1], scale_b [1, N], float32 accumulation, bf16 out: row-wise
    scaling's output type on every architecture PyTorch supports it; cast once for float16 models), bias and
    residual added after it. Elsewhere the same quantisation, emulated: x and w dequantised from e4m3, the
    product in x's dtype. Raises ValueError for mismatched shapes."""
    if x.dim() != 2 or x.shape[1] != weight.values.shape[1]:
        raise ValueError(f"fp8_linear takes x [M, {weight.values.shape[1]}], got shape {tuple(x.shape)}")
    n, k = weight.values.shape
    if hardware_fp8(x.device, x.dtype) and k % _ALIGNMENT == 0 and n % _ALIGNMENT == 0:
        x_fp8, x_scale = quantize_rows(x)
        out = torch._scaled_mm(x_fp8, weight.values.t(), scale_a=x_scale, scale_b=weight.scale,
                               out_dtype=torch.bfloat16)
        out = out if x.dtype == torch.bfloat16 else out.to(x.dtype)
    else:
        x_fp8, x_scale = quantize_rows_reference(x)
        dequantized = (x_fp8.float() * x_scale).to(x.dtype)
        out = dequantized @ weight.dequantize(x.dtype).t()
    if bias is not None:
        out = out + bias
    if residual is not None:
        out = out + residual
    return out
