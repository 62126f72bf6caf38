"""The probe pass's FP8 weights (kernels/fp8.py, chunkcache/probe_weights.py), on the CPU: quantisation error
bounds, the emulated product against the float one, the rule's `probe_weights` choice, and on the real SmolLM2
the FP8 probe ranking chunk tokens as the model's own weights do. Blending's invariants with the FP8 probe
(r = 1 full prefill, r = 0 full reuse, the count following the budget) are among test_blend.py's rules."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.blend import ChunkLoader, _layout, precompute_chunk
from blendgate.chunkcache.probe import probe_eager
from blendgate.chunkcache.probe_weights import Fp8Projections, probe_projections
from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.kernels.fp8 import FP8, FP8_MAX, SCALE_FLOOR, fp8_linear, hardware_fp8, quantize_rows, quantize_weight


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_a_quantised_weight_is_within_e4m3s_rounding_of_the_original() -> None:
    generator = torch.Generator().manual_seed(0)
    # Channels of very different magnitudes, and an all-zero one.
    w = torch.randn(48, 160, generator=generator) * torch.logspace(-4, 2, 48)[:, None]
    w[7] = 0
    quantised = quantize_weight(w)
    assert quantised.values.dtype == FP8 and quantised.values.shape == (48, 160) and quantised.values.is_contiguous()
    assert quantised.scale.dtype == torch.float32 and quantised.scale.shape == (1, 48)
    torch.testing.assert_close(quantised.scale[0], (w.abs().amax(dim=1) / FP8_MAX).clamp_min(SCALE_FLOOR))
    assert quantised.values.float().abs().max() <= FP8_MAX
    back = quantised.dequantize()
    assert torch.equal(back[7], torch.zeros(160)) and back.isfinite().all()
    # 3 mantissa bits: a normal number moves by at most 2^-4 of itself; a subnormal by half of 2^-9 (in units of
    # the channel's scale).
    bound = w.abs() * 2.0 ** -4 + quantised.scale.t() * 2.0 ** -10
    assert ((back - w).abs() <= bound * (1 + 1e-6)).all()
    # Each channel's largest entry is exact (it maps to 448).
    torch.testing.assert_close(back.abs().amax(dim=1), w.abs().amax(dim=1))


def test_the_rows_of_activations_get_scales_of_their_own() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 10.0, -1000.0]], dtype=torch.bfloat16)
    values, scales = quantize_rows(x)
    assert values.dtype == FP8 and scales.shape == (3, 1)
    torch.testing.assert_close(scales[:, 0], torch.tensor([2.0 / 448, SCALE_FLOOR, 1000.0 / 448]))
    assert torch.equal(values[1].float(), torch.zeros(3))
    torch.testing.assert_close((values.float() * scales), x.float(), rtol=2.0 ** -4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_emulated_fp8_product_is_close_to_the_float_one(dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(37, 256, generator=generator).to(dtype)
    w = (torch.randn(96, 256, generator=generator) * 0.05).to(dtype)
    bias, residual = torch.randn(96, generator=generator).to(dtype), torch.randn(37, 96, generator=generator).to(dtype)
    weight = quantize_weight(w)
    plain = x.float() @ w.float().t()
    product = fp8_linear(x, weight)
    assert product.dtype == dtype and product.shape == (37, 96)
    assert relative_error(product, plain) < 0.05  # measured 0.037 (two e4m3 roundings)
    both = fp8_linear(x, weight, bias=bias, residual=residual)
    torch.testing.assert_close(both, product + bias + residual)
    with pytest.raises(ValueError, match="fp8_linear takes x"):
        fp8_linear(x[:, :128], weight)


def test_fp8_products_run_on_the_hardware_only_where_it_has_them() -> None:
    assert not hardware_fp8(torch.device("cpu"), torch.bfloat16)
    assert not hardware_fp8(torch.device("cpu"), torch.float32)


def test_the_rule_names_which_weights_the_probe_reads() -> None:
    assert DEFAULT_RULE.probe_weights == "model"  # the FP8 copy measured not to pay on the H200
    assert SelectionRule("attention", probe_weights="fp8").probe_weights == "fp8"
    with pytest.raises(ValueError, match="probe_weights must be one of auto, model, fp8"):
        SelectionRule("attention", probe_weights="int4")


@pytest.fixture(scope="module")
def tiny() -> LlamaFamilyModel:
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", vocab_size=100, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32, seed=2)


def test_auto_keeps_the_models_own_weights_where_fp8_would_be_emulated(tiny) -> None:
    assert probe_projections(tiny, "auto") is tiny
    assert probe_projections(tiny, "model") is tiny
    fp8 = probe_projections(tiny, "fp8")
    assert isinstance(fp8, Fp8Projections) and probe_projections(tiny, "fp8") is fp8  # made once per model
    with pytest.raises(ValueError, match="probe_weights"):
        probe_projections(tiny, "int4")


def test_the_fp8_layer_pieces_keep_the_models_contracts(tiny) -> None:
    """Same shapes and nearly the same numbers as the model's own project_qkv and finish_layer, the qkv bias of
    a Qwen2-style model included."""
    fp8 = Fp8Projections.for_model(tiny)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 64, generator=generator)
    attention = torch.randn(9, 64, generator=generator)
    assert tiny.layers[1].qkv_bias is not None
    for layer in range(tiny.num_layers):
        expected = tiny.project_qkv(layer, hidden)
        assert relative_error(fp8.project_qkv(layer, hidden), expected) < 0.06
        finished = tiny.finish_layer(layer, hidden, attention)
        # Relative to what the layer adds to the residual stream (the residual itself is exact).
        assert relative_error(fp8.finish_layer(layer, hidden, attention) - hidden, finished - hidden) < 0.08


DOCUMENTS = [
    "The blue castle stands on a granite hill above the town of Arn. It was built in 1420 by the counts of Arn, "
    "who kept their archives in its north tower. Its secret code, written on a stone above the gate, is 4711.",
    "The Silverrun river flows north for 312 kilometres from the lakes of the high plateau to the sea. Salmon "
    "swim up it every autumn, and a ferry crosses it at Miller's Ford, where the old mill still turns.",
    "The corner bakery sells rye bread on Tuesdays and sourdough on Fridays. Its owner, Marta, learned baking "
    "in Vienna and opens the shop at six every morning, an hour before the market.",
    "Every summer the town holds a music festival in the castle courtyard. Choirs from the villages of the "
    "valley sing on the first evening, and the festival ends with fireworks over the river.",
]


def test_on_smollm2_the_fp8_probe_ranks_chunk_tokens_as_the_models_weights_do(loaded_model) -> None:
    """The probe only ranks: with FP8 weights (emulated on the CPU, the rounding of the GPU's products) the top
    15% of chunk tokens by attention mass are nearly those of the model's own weights (measured: 27 of 28, the
    mass within 1.0%)."""
    model = LlamaFamilyModel.from_transformers(loaded_model.model)
    tokenizer = loaded_model.tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    segments: list = [encode("<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n"
                             "Documents:")]
    with torch.no_grad():
        for i, document in enumerate(DOCUMENTS, start=1):
            segments += [encode(f"\n\n[{i}]"), precompute_chunk(model, encode(" " + document))]
        segments.append(encode("\n\nQuestion: What is the secret code of the blue castle?<|im_end|>\n"
                               "<|im_start|>assistant\n"))
        layout = _layout(segments, None)
        total = len(layout.ids)
        cos, sin = model.rope(torch.arange(total))

        def mass(projections) -> torch.Tensor:
            cache = model.new_cache(total)
            cache.positions[:total], cache.length = torch.arange(total), total
            loader = ChunkLoader(cache, layout.placements, cos, sin, 0)
            return probe_eager(model, layout.ids, layout.other_rows, len(layout.vote_rows), total, cache,
                               loader.ready, cos, sin, model.num_layers, projections)[layout.chunk_rows]

        own, fp8 = mass(probe_projections(model, "model")), mass(probe_projections(model, "fp8"))
    assert relative_error(fp8, own) < 0.04
    top = round(0.15 * own.numel())
    overlap = len(set(own.topk(top).indices.tolist()) & set(fp8.topk(top).indices.tolist())) / top
    assert overlap >= 0.85
