"""The probe pass's FP8 weights on the GPU (kernels/fp8.py, chunkcache/probe_weights.py): the per-row
quantisation kernels (alone, after RMSNorm, after a residual add and RMSNorm, after SwiGLU) against their
references, torch._scaled_mm's product against the emulation that CPU tests and float32 models run, the
capability check, and the probe replayed from CUDA graphs on the FP8 copy against the same pass launched op by
op (graphs kept apart from the model-weight ones)."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.blend import ChunkLoader, _layout, blend_prefill, precompute_chunk
from blendgate.chunkcache.probe import ProbeGraphs, probe_eager
from blendgate.chunkcache.probe_weights import Fp8Projections, probe_projections
from blendgate.chunkcache.selection import SelectionRule
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.kernels.fp8 import (
    Fp8Weight,
    add_rms_norm_quantize,
    add_rms_norm_quantize_reference,
    fp8_linear,
    hardware_fp8,
    quantize_rows,
    quantize_rows_reference,
    quantize_weight,
    rms_norm_quantize,
    rms_norm_quantize_reference,
    silu_and_mul_quantize,
    silu_and_mul_quantize_reference,
)
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8 = pytest.mark.skipif(not FP8_GPU, reason="needs FP8 products (compute capability 8.9 or later)")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_the_capability_check() -> None:
    device = torch.device("cuda")
    assert hardware_fp8(device, torch.bfloat16) == FP8_GPU == hardware_fp8(device, torch.float16)
    assert not hardware_fp8(device, torch.float32)


@needs_fp8
@pytest.mark.parametrize("rows,width", [(1, 576), (64, 4096), (37, 14336), (0, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_row_quantisation_kernel_equals_its_reference(rows, width, dtype) -> None:
    x = torch.randn(rows, width, device="cuda") * torch.logspace(-3, 2, max(rows, 1), device="cuda")[:rows, None]
    x = x.to(dtype)
    if rows:
        x[0] = 0
    same_quantisation(quantize_rows(x), quantize_rows_reference(x))


def same_quantisation(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor],
                      share: float = 1e-4) -> None:
    """The same scales, and the same e4m3 values but for a few one step apart (both round to nearest even; a
    float32 quotient, a sigmoid or a bfloat16 product one ulp apart can only move a value sitting on a tie)."""
    (values, scales), (expected_values, expected_scales) = got, expected
    assert values.dtype == expected_values.dtype and values.shape == expected_values.shape
    torch.testing.assert_close(scales, expected_scales, rtol=1e-5, atol=0)
    differ = values.float() != expected_values.float()
    assert int(differ.sum()) <= max(1, int(differ.numel() * share))
    torch.testing.assert_close(values.float(), expected_values.float(), rtol=2.0 ** -3, atol=2.0 ** -9)


@needs_fp8
@pytest.mark.parametrize("rows,hidden,inter", [(1, 576, 1536), (64, 4096, 14336), (37, 256, 512), (0, 256, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_fused_add_norm_and_activation_quantisers_equal_their_references(rows, hidden, inter, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(hidden)
    x = (torch.randn(rows, hidden, device="cuda", generator=generator) * 3).to(dtype)
    weight = (torch.rand(hidden, device="cuda", generator=generator) + 0.5).to(dtype)
    same_quantisation(rms_norm_quantize(x, weight, 1e-5), rms_norm_quantize_reference(x, weight, 1e-5))
    residual = (torch.randn(rows, hidden, device="cuda", generator=generator) * 5).to(dtype)
    total, *quantised = add_rms_norm_quantize(x, residual, weight, 1e-5)
    expected_total, *expected = add_rms_norm_quantize_reference(x, residual, weight, 1e-5)
    assert torch.equal(total, expected_total)
    same_quantisation(tuple(quantised), tuple(expected))
    gate_up = (torch.randn(rows, 2 * inter, device="cuda", generator=generator) * 2).to(dtype)
    # SwiGLU's sigmoid differs from PyTorch's by an ulp at times, before the rounding to the model's dtype.
    same_quantisation(silu_and_mul_quantize(gate_up), silu_and_mul_quantize_reference(gate_up), share=1e-3)


def emulated(x: torch.Tensor, weight: Fp8Weight) -> torch.Tensor:
    """fp8_linear's emulation (the CPU's path) run on the GPU: the same numbers, float32 throughout."""
    x_fp8, x_scale = quantize_rows_reference(x)
    return (x_fp8.float() * x_scale) @ weight.dequantize().t()


@needs_fp8
@pytest.mark.parametrize("rows,k,n", [(64, 4096, 6144), (64, 14336, 4096), (32, 256, 384), (5, 576, 960),
                                      (1, 576, 960)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_hardware_product_equals_the_emulation(rows, k, n, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(rows + k)
    x = torch.randn(rows, k, device="cuda", generator=generator).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=generator) * 0.02).to(dtype)
    residual = torch.randn(rows, n, device="cuda", generator=generator).to(dtype)
    weight = quantize_weight(w)
    product = fp8_linear(x, weight)
    assert product.dtype == dtype and product.shape == (rows, n)
    # The same e4m3 operands: only the accumulation order and the output's rounding differ.
    assert relative_error(product, emulated(x, weight)) < 1e-2
    assert relative_error(product, x.float() @ w.float().t()) < 0.06  # the two e4m3 roundings
    torch.testing.assert_close(fp8_linear(x, weight, residual=residual), product + residual)


@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return LlamaFamilyModel.random(tiny_config(max_positions=8192), device="cuda", dtype=torch.bfloat16, seed=7)


def prompt(model: LlamaFamilyModel, seed: int, chunks: int, length: int, question: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    segments: list = [torch.randint(0, 512, (9,), generator=generator).tolist()]
    for i in range(chunks):
        segments += [precompute_chunk(model, torch.randint(0, 512, (length + i,), generator=generator).tolist()),
                     [1, 2]]
    segments.append(torch.randint(0, 512, (question,), generator=generator).tolist())
    return segments


def both_probes(model: LlamaFamilyModel, segments: list, projections) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(segments, None)
    total = len(layout.ids)
    positions = torch.arange(total, device="cuda")
    cos, sin = model.rope(positions)
    ids, rows = layout.ids.to("cuda"), layout.other_rows.to("cuda")
    cache = model.new_cache(total)
    cache.positions[:total], cache.length = positions, total
    with torch.no_grad():
        loader = ChunkLoader(cache, layout.placements, cos, sin, 0)
        eager = probe_eager(model, ids, rows, len(layout.vote_rows), total, cache, loader.ready, cos, sin,
                            model.num_layers, projections)
        graphs = ProbeGraphs.for_model(model)
        with graphs.arena_for(total, rows.shape[0]) as arena:
            loader = ChunkLoader(arena, layout.placements, cos, sin, 0)
            graphed = graphs.probe(ids, rows, len(layout.vote_rows), total, cos, sin, loader.ready,
                                   model.num_layers, projections).clone()
    chunk = layout.chunk_rows.to("cuda")
    return eager[chunk], graphed[chunk]


@needs_fp8
def test_auto_picks_the_fp8_copy_on_an_fp8_gpu(model) -> None:
    assert isinstance(probe_projections(model, "auto"), Fp8Projections)
    assert probe_projections(model, "auto") is probe_projections(model, "fp8")


@needs_fp8
@pytest.mark.parametrize("chunks,length,question", [(3, 100, 7), (5, 301, 33), (9, 130, 17)])
def test_graphs_on_the_fp8_copy_give_the_scores_of_the_eager_fp8_probe(model, chunks, length, question) -> None:
    assert ProbeGraphs.usable(model)
    segments = prompt(model, chunks, chunks, length, question)
    fp8 = probe_projections(model, "fp8")
    eager, graphed = both_probes(model, segments, fp8)
    assert not graphed.isnan().any()
    assert relative_error(graphed, eager) < 1e-2  # padding changes the reduction order only
    # The model's own weights: graphs of their own (the same shape, another key), scores close to the FP8 ones.
    own_eager, own_graphed = both_probes(model, segments, model)
    assert relative_error(own_graphed, own_eager) < 1e-2
    # Measured with the emulation on the CPU (this model in bfloat16): within 0.05% and 96-98% of the top 1/7.
    assert relative_error(graphed, own_graphed) < 0.05
    top = max(1, eager.numel() // 7)
    same = set(torch.topk(graphed, top).indices.tolist()) & set(torch.topk(own_graphed, top).indices.tolist())
    assert len(same) >= 0.8 * top
    keys = list(ProbeGraphs.for_model(model).captured.keys())
    assert {key[3] for key in keys} >= {fp8, model}


@needs_fp8
def test_a_blend_on_the_fp8_probe_keeps_the_limits_and_selects_near_the_model_weights_probe(model) -> None:
    segments = prompt(model, 31, 6, 250, 20)
    fp8, own = (SelectionRule("attention", sink_tokens=4, drift_shift=0.5, probe_weights=weights)
                for weights in ("fp8", "model"))
    chosen = blend_prefill(model, segments, 0.15, rule=fp8)
    expected = blend_prefill(model, segments, 0.15, rule=own)
    assert chosen.recomputed_chunk_tokens == expected.recomputed_chunk_tokens
    overlap = set(chosen.selected_rows.tolist()) & set(expected.selected_rows.tolist())
    assert len(overlap) >= 0.8 * expected.recomputed_chunk_tokens  # 97% with the emulation on the CPU
    torch.testing.assert_close(blend_prefill(model, segments, 1.0, rule=fp8).logits,
                               blend_prefill(model, segments, 1.0, rule=own).logits)
    assert blend_prefill(model, segments, 0.0, rule=fp8).recomputed_chunk_tokens == 0
