"""kernels/weight_only.py: int8 and int4 weight-only products (the quantisers' rounding and packing, the
reference on CPU; the Triton kernel under TRITON_INTERPRET=1 where triton is installed, and on CUDA in
tests/gpu/test_weight_only_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from blendgate.kernels import weight_only


def weight(n: int, k: int) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02


def test_int8_values_and_scales_bound_the_error() -> None:
    w = weight(48, 128)
    q = weight_only.quantize_int8(w)
    assert q.values.dtype == torch.int8 and q.values.shape == (48, 128) and q.scale.shape == (1, 48)
    assert q.values.abs().max() <= 127
    # Rounding to nearest: at most half a step per value, a step being the channel's amax / 127.
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-7).all()


def test_int4_packing_round_trips_every_nibble() -> None:
    # Values on the grid quantise exactly: each group's amax is 7 steps, the others any of -7..7.
    groups = torch.randint(-7, 8, (6, 4, 64), generator=torch.Generator().manual_seed(2)).float()
    groups[:, :, 0] = 7
    scale = torch.tensor([0.5, 0.25, 1.0, 2.0])
    w = (groups * scale[None, :, None]).reshape(6, 256)
    q = weight_only.quantize_int4(w)
    assert q.values.shape == (6, 128) and q.values.dtype == torch.uint8 and q.scale.shape == (4, 6)
    assert torch.equal(q.dequantize(), w)
    assert q.nbytes == 6 * 128 + 4 * 6 * 2


def test_int4_error_is_half_a_step_of_its_group() -> None:
    w = weight(16, 192)
    q = weight_only.quantize_int4(w, group=64)
    step = (w.view(16, 3, 64).abs().amax(dim=2, keepdim=True) / 7).expand(16, 3, 64).reshape(16, 192)
    assert ((q.dequantize() - w).abs() <= step / 2 + step * 1e-3).all()  # the scale is float16: 1e-3 relative


def test_an_all_zero_channel_quantises_to_zeros() -> None:
    w = weight(4, 64)
    w[1] = 0
    for q in (weight_only.quantize_int8(w), weight_only.quantize_int4(w)):
        assert torch.equal(q.dequantize()[1], torch.zeros(64)) and q.dequantize().isfinite().all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [0, 1, 37, 70])
def test_the_product_equals_the_dequantised_weights_product(bits, rows) -> None:
    w = weight(40, 256)
    q = weight_only.quantize_int8(w) if bits == 8 else weight_only.quantize_int4(w)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(3))
    bias, residual = torch.randn(40), torch.randn(rows, 40)
    expected = x @ q.dequantize().t() + bias + residual
    for config in (None, weight_only.LaunchConfig(block_n=32, split_k=3)):
        got = weight_only.weight_only_linear(x, q, bias=bias, residual=residual, config=config)
        assert got.shape == (rows, 40)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_are_refused() -> None:
    q = weight_only.quantize_int8(weight(8, 64))
    with pytest.raises(ValueError, match="weight_only_linear takes x"):
        weight_only.weight_only_linear(torch.randn(3, 32), q)
    with pytest.raises(ValueError, match="quantize_int4"):
        weight_only.quantize_int4(weight(8, 96), group=64)
    with pytest.raises(ValueError, match="quantize_int8"):
        weight_only.quantize_int8(torch.randn(8))
