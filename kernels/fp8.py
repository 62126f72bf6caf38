"""FP8 (e4m3) matrix products for weight-bound passes: weights quantised once, activations per row.

A pass of a few dozen rows through a layer (blending's probe pass, chunkcache/probe.py) is bound by reading
the weights: at bf16 the H200's four products of a Llama-3-8B layer run at HBM bandwidth. Weights in e4m3
halve the bytes read. Scales follow the "rowwise" recipe of PyTorch's `torch._scaled_mm` (and of vLLM's and
SGLang's per-channel FP8 linears): one float32 scale per output channel of the weight, amax / 448 (e4m3's
largest finite value), and one per row of the activations, computed on the fly.

- `quantize_weight(w [N, K]) -> Fp8Weight`: once per weight.
- `quantize_rows(x [M, K]) -> (x_fp8 [M, K], scale [M, 1] float32)`: per-row dynamic quantisation, one Triton
  launch on GPUs with e4m3 (`quantize_rows_reference` is the same rounding in PyTorch, and serves elsewhere);
  `rms_norm_quantize`, `add_rms_norm_quantize` and `silu_and_mul_quantize` fuse it with the ops that make a
  Llama layer's product inputs (RMSNorm before qkv; the attention's residual add and RMSNorm before gate_up;
  SwiGLU before down): one launch instead of two or three, the same numbers as the references in turn.
- `fp8_product(x_fp8, x_scale, weight, dtype, bias, residual)`: the product of quantised rows. On CUDA at compute
  capability 8.9 or later (`hardware_fp8`), `torch._scaled_mm` with row-wise scales; elsewhere an emulation
  with the same rounding (x and w dequantised, the product in `dtype`), so a float32 model on the CPU shows
  what FP8 does to a result. `fp8_linear(x, weight, bias, residual)` quantises x and takes it.
No host synchronisation anywhere: capturable in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .activation import silu_and_mul_reference
from .norm import rms_norm, rms_norm_reference

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
    Connects `quantize_weight` (once per model) and `fp8_product` / `fp8_linear` (each product).

    values: [N, K] float8_e4m3fn, row-major (so values.t() is the column-major second operand _scaled_mm wants).
    scale: [1, N] float32 (the row-wise scale_b of torch._scaled_mm)."""

    values: torch.Tensor
    scale: torch.Tensor

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
    def _store_quantized(values, out, scales, row, cols, inside, width, floor):
        """One row's float32 values, quantised with their own scale (quantize_rows_reference's rounding)."""
        scale = tl.maximum(tl.max(tl.abs(values), axis=0) / 448.0, floor)
        scaled = tl.minimum(tl.maximum(values / scale, -448.0), 448.0)
        tl.store(out + row * width + cols, scaled.to(out.dtype.element_ty), mask=inside)
        tl.store(scales + row, scale)

    @triton.jit
    def _store_rms_normed_quantized(values, w, out, scales, row, cols, inside, hidden, eps, floor):
        """One row's float32 values RMS-normalised as rms_norm does (in float32, rounded to the model's dtype,
        scaled by the weight `w` in that dtype), then quantised (_store_quantized)."""
        inverse = tl.rsqrt(tl.sum(values * values, axis=0) / hidden + eps)
        normed = (w * (values * inverse).to(w.dtype)).to(w.dtype).to(tl.float32)
        _store_quantized(normed, out, scales, row, cols, inside, hidden, floor)

    @triton.jit
    def _rms_norm_quantize_kernel(x, weight, out, scales, hidden, row_stride, eps, floor, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        values = tl.load(x + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(weight + cols, mask=inside, other=0.0)
        _store_rms_normed_quantized(values, w, out, scales, row, cols, inside, hidden, eps, floor)

    @triton.jit
    def _add_rms_norm_quantize_kernel(delta, residual, weight, total, out, scales, hidden, eps, floor,
                                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        w = tl.load(weight + cols, mask=inside, other=0.0)
        summed = (tl.load(delta + row * hidden + cols, mask=inside, other=0.0).to(tl.float32)
                  + tl.load(residual + row * hidden + cols, mask=inside, other=0.0).to(tl.float32)).to(w.dtype)
        tl.store(total + row * hidden + cols, summed, mask=inside)
        _store_rms_normed_quantized(summed.to(tl.float32), w, out, scales, row, cols, inside, hidden, eps, floor)

    @triton.jit
    def _silu_and_mul_quantize_kernel(gate_up, out, scales, inter, row_stride, floor, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < inter
        gate = tl.load(gate_up + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * row_stride + inter + cols, mask=inside, other=0.0)
        # As silu_and_mul: silu(gate) in the model's dtype, then the product in it.
        activated = (gate * tl.sigmoid(gate)).to(up.dtype)
        product = (activated.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)
        _store_quantized(product, out, scales, row, cols, inside, inter, floor)

    @triton.jit
    def _quantize_rows_kernel(x, out, scales, width, row_stride, floor, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        values = tl.load(x + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
        _store_quantized(values, out, scales, row, cols, inside, width, floor)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `quantize_rows_reference`, one launch on CUDA GPUs with e4m3 (hardware_fp8; out [M, K] contiguous)."""
    if not _fused(x):
        return quantize_rows_reference(x)
    rows, width = x.shape
    out = torch.empty((rows, width), dtype=FP8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _launch_shape(width)
        _quantize_rows_kernel[(rows,)](x, out, scales, width, x.stride(0), SCALE_FLOOR, BLOCK=block,
                                       num_warps=warps)
    return out, scales


def _fused(x: torch.Tensor) -> bool:
    """Whether a fused quantising kernel takes x (else the references, one after the other)."""
    return triton is not None and x.dim() == 2 and x.stride(-1) == 1 and hardware_fp8(x.device, torch.bfloat16)


def _launch_shape(width: int) -> tuple[int, int]:
    block = triton.next_power_of_2(width)
    return block, 16 if block >= 8192 else 8 if block >= 2048 else 4


def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, hidden] -> RMSNorm (kernels/norm.py) quantised per row: (e4m3 [M, hidden], scale [M, 1] float32);
    one launch on GPUs with e4m3, rms_norm then quantize_rows elsewhere (the same numbers)."""
    if not _fused(x) or weight.dtype != x.dtype:
        return quantize_rows(rms_norm(x, weight, eps))
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=FP8, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _launch_shape(hidden)
        _rms_norm_quantize_kernel[(rows,)](x, weight, out, scales, hidden, x.stride(0), eps, SCALE_FLOOR,
                                           BLOCK=block, num_warps=warps)
    return out, scales


def rms_norm_quantize_reference(x: torch.Tensor, weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_reference, then quantize_rows_reference."""
    return quantize_rows_reference(rms_norm_reference(x, weight, eps))


def add_rms_norm_quantize(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual stream after a sublayer and the next norm's quantised output: hidden = delta + residual
    ([M, hidden], the model's dtype), then rms_norm_quantize(hidden). Returns (hidden, e4m3 [M, hidden],
    scale [M, 1] float32); one launch on GPUs with e4m3 (contiguous inputs), the references elsewhere."""
    fused = (_fused(delta) and delta.is_contiguous() and residual.is_contiguous() and
             delta.dtype == residual.dtype == weight.dtype and delta.shape == residual.shape)
    if not fused:
        hidden = delta + residual
        return (hidden, *rms_norm_quantize(hidden, weight, eps))
    rows, width = delta.shape
    hidden = torch.empty_like(delta)
    out = torch.empty((rows, width), dtype=FP8, device=delta.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=delta.device)
    if rows:
        block, warps = _launch_shape(width)
        _add_rms_norm_quantize_kernel[(rows,)](delta, residual, weight, hidden, out, scales, width, eps,
                                               SCALE_FLOOR, BLOCK=block, num_warps=warps)
    return hidden, out, scales


def add_rms_norm_quantize_reference(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The add in the model's dtype, then rms_norm_quantize_reference."""
    hidden = delta + residual
    return (hidden, *rms_norm_quantize_reference(hidden, weight, eps))


def silu_and_mul_quantize(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2 * inter] -> SwiGLU's silu(gate) * up (kernels/activation.py) quantised per row:
    (e4m3 [M, inter], scale [M, 1] float32); one launch on GPUs with e4m3, the two references elsewhere."""
    if not _fused(gate_up):
        return quantize_rows_reference(silu_and_mul_reference(gate_up))
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=FP8, device=gate_up.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=gate_up.device)
    if rows:
        block, warps = _launch_shape(inter)
        _silu_and_mul_quantize_kernel[(rows,)](gate_up, out, scales, inter, gate_up.stride(0), SCALE_FLOOR,
                                               BLOCK=block, num_warps=warps)
    return out, scales


def silu_and_mul_quantize_reference(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul_reference, then quantize_rows_reference."""
    return quantize_rows_reference(silu_and_mul_reference(gate_up))


def hardware_fp8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FP8 products run on the hardware for activations of `dtype` on `device`: CUDA at compute
    capability 8.9 (Ada) or later, and a half-precision dtype (float16 or bfloat16)."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_product(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: Fp8Weight, dtype: torch.dtype,
                bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Quantised rows x_fp8 [M, K] (scale [M, 1] float32) @ weight.t() (+ bias [N]) (+ residual [M, N]) ->
    [M, N] in `dtype` (the model's).

    Hardware path (hardware_fp8 for `dtype`, K and N multiples of 16): torch._scaled_mm(x_fp8 row-major,
    w_fp8.t() [K, N] column-major, scale_a [M, 1], scale_b [1, N]), float32 accumulation, bf16 out (row-wise
    scaling's output type on every architecture PyTorch supports it on; cast once for float16 models), bias and
    residual added after it. Elsewhere the emulation: x and w dequantised to `dtype`, the product in it."""
    n, k = weight.values.shape
    if hardware_fp8(x_fp8.device, dtype) and k % _ALIGNMENT == 0 and n % _ALIGNMENT == 0:
        out = torch._scaled_mm(x_fp8, weight.values.t(), scale_a=x_scale, scale_b=weight.scale,
                               out_dtype=torch.bfloat16)
        out = out if dtype == torch.bfloat16 else out.to(dtype)
    else:
        out = (x_fp8.float() * x_scale).to(dtype) @ weight.dequantize(dtype).t()
    if bias is not None:
        out = out + bias
    if residual is not None:
        out = out + residual
    return out


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] half/bf16/float32 @ weight.t() (+ bias) (+ residual) -> [M, N] in x's dtype: x quantised per
    row (quantize_rows), then fp8_product. Raises ValueError for mismatched shapes."""
    if x.dim() != 2 or x.shape[1] != weight.values.shape[1]:
        raise ValueError(f"fp8_linear takes x [M, {weight.values.shape[1]}], got shape {tuple(x.shape)}")
    x_fp8, x_scale = quantize_rows(x)
    return fp8_product(x_fp8, x_scale, weight, x.dtype, bias=bias, residual=residual)
