"""Weight-only quantised matrix products for weight-bound passes: int8 or int4 weights, bf16 rows.

A pass of a few dozen rows through a layer (blending's probe pass, chunkcache/probe.py) is bound by reading
the weights (bench/results/ttft-2026-12-01.md: 125 us of a Llama-3-8B probe layer's 181 on the H200 go to four
bf16 products at 3.5-3.8 TB/s). Weights with fewer bits are fewer bytes to read; the rows stay in the model's
dtype, so nothing quantises the activations (the FP8 products of kernels/fp8.py quantise every row, a launch
each, and torch._scaled_mm at 64 rows reads far below bandwidth). As the W8A16/W4A16 kernels of vLLM and
SGLang (and gpt-fast's int8/int4 weight-only products): the weights are dequantised in registers, the product
runs on the tensor cores in the rows' dtype with float32 accumulation.

- `quantize_int8(w [N, K]) -> QuantisedWeight`: one int8 per value, symmetric, one float32 scale per output
  channel (amax / 127).
- `quantize_int4(w [N, K], group=64) -> QuantisedWeight`: 4 bits per value, symmetric in [-7, 7], one float16
  scale per output channel and group of `group` consecutive input channels (amax / 7). Packed two to a byte:
  byte i of a group holds value i in its low nibble and value i + group / 2 in its high one, each stored + 8
  (so a group's two halves unpack into two contiguous tiles, no interleaving in the kernel).
- `weight_only_linear(x [M, K], weight, bias, residual, config) -> [M, N]` in x's dtype: one Triton launch on
  CUDA (split over K for narrow outputs, the partial sums added after), the reference elsewhere
  (`weight_only_linear_reference`: the weight dequantised, the product in x's dtype).
No host synchronisation: capturable in CUDA graphs. Checked against the reference under TRITON_INTERPRET=1 on
CPU tensors (tests/test_weight_only.py) and on the GPU (tests/gpu/test_weight_only_cuda.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

INT8_BLOCK_K = 64  # input channels an iteration of the int8 product reads (K must be a multiple)
INT4_GROUP = 64  # input channels sharing a scale: divides every Llama-family width in use (SmolLM2's 576 too)
_SCALE_FLOOR = 1e-6  # an all-zero channel or group quantises to zeros instead of dividing by zero
_TARGET_PROGRAMS = 264  # about two programs per SM of an H100/H200 (132 SMs)


@dataclass(frozen=True)
class QuantisedWeight:
    """A linear layer's weight [N, K] with 8 or 4 bits per value. Connects `quantize_int8`/`quantize_int4`
    (once per model) and `weight_only_linear` (each product).

    bits 8: values int8 [N, K], scale float32 [1, N]; w ~= values * scale.t(); `group` is the kernel's step
    along K (INT8_BLOCK_K).
    bits 4: values uint8 [N, K // 2] (packing in the module docstring), scale float16 [K // group, N];
    w[n, g * group + i] ~= (nibble - 8) * scale[g, n]."""

    values: torch.Tensor
    scale: torch.Tensor
    bits: int
    in_features: int
    group: int

    @property
    def out_features(self) -> int:
        return self.values.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes read by one product: values and scales."""
        return self.values.numel() * self.values.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in `dtype`: the weight as the product sees it."""
        if self.bits == 8:
            return (self.values.float() * self.scale.t()).to(dtype)
        n, k, g = self.out_features, self.in_features, self.group
        packed = self.values.view(n, k // g, g // 2)
        low = (packed & 15).to(torch.int16) - 8
        high = (packed >> 4).to(torch.int16) - 8
        q = torch.cat((low, high), dim=2).float()  # [N, groups, g]
        return (q * self.scale.float().t().unsqueeze(2)).reshape(n, k).to(dtype)


def quantize_int8(w: torch.Tensor) -> QuantisedWeight:
    """w [N, K] (any float dtype) -> int8 values with one float32 scale per output channel (amax / 127)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8 takes a weight [N, K], got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=_SCALE_FLOOR)
    values = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return QuantisedWeight(values, scale[None, :].contiguous(), 8, w.shape[1], INT8_BLOCK_K)


def quantize_int4(w: torch.Tensor, group: int | None = None) -> QuantisedWeight:
    """w [N, K] (any float dtype) -> 4-bit values, one float16 scale per output channel and group of `group`
    input channels (amax / 7, values in [-7, 7]; None: INT4_GROUP, or the largest power of two below it that
    divides K; the kernel takes groups of 32 or more, smaller ones run the reference). Raises ValueError unless
    group is even and divides K."""
    if group is None and w.dim() == 2:
        group = next((g for g in (INT4_GROUP, 32, 16, 8, 4, 2) if w.shape[1] % g == 0), 0)
    if w.dim() != 2 or not group or group % 2 or w.shape[1] % group:
        raise ValueError(f"quantize_int4 takes a weight [N, K] with K a multiple of an even group, got shape "
                         f"{tuple(w.shape)} and group {group}")
    n, k = w.shape
    groups = w.detach().float().view(n, k // group, group)
    scale = (groups.abs().amax(dim=2) / 7.0).clamp(min=_SCALE_FLOOR).half()  # [N, groups]
    q = torch.round(groups / scale.float()[:, :, None]).clamp(-7, 7).to(torch.int16) + 8  # 1..15
    packed = (q[:, :, : group // 2] | (q[:, :, group // 2:] << 4)).to(torch.uint8).reshape(n, k // 2)
    return QuantisedWeight(packed.contiguous(), scale.t().contiguous(), 4, k, group)


def _check(x: torch.Tensor, weight: QuantisedWeight) -> None:
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"weight_only_linear takes x [M, {weight.in_features}], got shape {tuple(x.shape)}")


def weight_only_linear_reference(x: torch.Tensor, weight: QuantisedWeight, bias: torch.Tensor | None = None,
                                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight.dequantize().t() (+ bias [N]) (+ residual [M, N]) -> [M, N], in x's dtype."""
    _check(x, weight)
    out = x @ weight.dequantize(x.dtype).t()
    if bias is not None:
        out = out + bias
    if residual is not None:
        out = out + residual
    return out


if triton is not None:

    @triton.jit
    def _weight_only_kernel(x, w, s, out, rows, n_out, k_in, k_per_split, x_row_stride, w_row_stride,
                            s_group_stride, out_split_stride, out_row_stride,
                            BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        # Program (n, split, m): outputs [m * BLOCK_M, +BLOCK_M) x [n * BLOCK_N, +BLOCK_N) over input channels
        # [split * k_per_split, +k_per_split), one group of GROUP channels an iteration.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < rows
        n_ok = rn < n_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, k_in)
        x_rows = x + rm[:, None].to(tl.int64) * x_row_stride
        w_rows = w + rn[None, :].to(tl.int64) * w_row_stride
        if BITS == 8:
            for k0 in range(k_start, k_end, GROUP):
                rk = k0 + tl.arange(0, GROUP)
                xv = tl.load(x_rows + rk[None, :], mask=m_ok[:, None], other=0.0)
                wv = tl.load(w_rows + rk[:, None], mask=n_ok[None, :], other=0)
                acc += tl.dot(xv, wv.to(xv.dtype))
            acc = acc * tl.load(s + rn, mask=n_ok, other=0.0)[None, :]
        else:
            HALF: tl.constexpr = GROUP // 2
            for k0 in range(k_start, k_end, GROUP):
                rk = k0 + tl.arange(0, HALF)
                x_low = tl.load(x_rows + rk[None, :], mask=m_ok[:, None], other=0.0)
                x_high = tl.load(x_rows + (rk + HALF)[None, :], mask=m_ok[:, None], other=0.0)
                packed = tl.load(w_rows + (k0 // 2 + tl.arange(0, HALF))[:, None], mask=n_ok[None, :], other=0)
                low = ((packed & 15).to(tl.int16) - 8).to(x_low.dtype)
                high = ((packed >> 4).to(tl.int16) - 8).to(x_low.dtype)
                part = tl.dot(x_low, low) + tl.dot(x_high, high)
                scale = tl.load(s + (k0 // GROUP) * s_group_stride + rn, mask=n_ok, other=0.0).to(tl.float32)
                acc += part * scale[None, :]
        target = out + pid_s * out_split_stride + rm[:, None].to(tl.int64) * out_row_stride + rn[None, :]
        tl.store(target, acc.to(out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """How `weight_only_linear` splits a product: BLOCK_N output channels a program, `split_k` programs along
    the input channels (0: chosen from the shape), warps and pipeline stages of each."""

    block_n: int = 64
    split_k: int = 0
    warps: int = 4
    stages: int = 4


def _kernel_takes(x: torch.Tensor, weight: QuantisedWeight) -> bool:
    on_gpu = (x.is_cuda and weight.values.device == x.device) or os.environ.get("TRITON_INTERPRET") == "1"
    return (triton is not None and on_gpu and x.stride(1) == 1 and weight.values.stride(1) == 1
            and weight.in_features % weight.group == 0 and weight.group % 32 == 0)


def _split_k(config: LaunchConfig, n_out: int, groups: int) -> int:
    if config.split_k:
        return max(1, min(config.split_k, groups))
    tiles = triton.cdiv(n_out, config.block_n)
    return max(1, min(groups, _TARGET_PROGRAMS // tiles))


def weight_only_linear(x: torch.Tensor, weight: QuantisedWeight, bias: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [M, K] (bf16/float16 on CUDA) @ weight.t() (+ bias [N]) (+ residual [M, N]) -> [M, N] in x's dtype.

    On CUDA one launch (and, when split over K, one sum of the float32 partials), float32 accumulation; the
    reference elsewhere. Raises ValueError for mismatched shapes."""
    _check(x, weight)
    if not _kernel_takes(x, weight):
        return weight_only_linear_reference(x, weight, bias, residual)
    config = config or LaunchConfig()
    rows, n_out, k_in = x.shape[0], weight.out_features, weight.in_features
    groups = k_in // weight.group
    split = _split_k(config, n_out, groups)
    k_per_split = triton.cdiv(groups, split) * weight.group
    split = triton.cdiv(k_in, k_per_split)
    out = torch.empty((split, rows, n_out), device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    if rows:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        grid = (triton.cdiv(n_out, config.block_n), split, triton.cdiv(rows, block_m))
        _weight_only_kernel[grid](
            x, weight.values, weight.scale, out, rows, n_out, k_in, k_per_split, x.stride(0),
            weight.values.stride(0), weight.scale.stride(0), out.stride(0), out.stride(1),
            BITS=weight.bits, GROUP=weight.group, BLOCK_M=block_m, BLOCK_N=config.block_n,
            num_warps=config.warps, num_stages=config.stages)
    result = out[0] if split == 1 else out.sum(dim=0).to(x.dtype)
    if bias is not None:
        result = result + bias
    if residual is not None:
        result = result + residual
    return result
