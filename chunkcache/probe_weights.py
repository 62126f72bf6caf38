"""Which weights the probe pass's matrix products read: the model's own, or an FP8 copy of them.

The probe pass (chunkcache/probe.py) runs a few dozen rows through every layer: its four matrix products a
layer (qkv, o, gate_up, down) are bound by reading the weights (on the H200 at Llama-3-8B shapes, 125 us a
layer at HBM bandwidth, two thirds of the probe). The probe only ranks chunk tokens, so `Fp8Projections`
holds the layers' matrices in e4m3 with a scale per output channel (kernels/fp8.py), half the bytes, and runs
a layer's pieces with the contracts of `LlamaFamilyModel.project_qkv` and `finish_layer`; norms and the qkv
bias are the model's own. `probe_projections` resolves a rule's `probe_weights` ("auto", "model", "fp8";
chunkcache/selection.py) to the object the probe calls.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..engine.instances import InstancePerKey
from ..engine.llama import LlamaFamilyModel
from ..kernels.activation import silu_and_mul
from ..kernels.fp8 import (
    Fp8Weight,
    add_rms_norm_quantize,
    fp8_linear,
    fp8_product,
    hardware_fp8,
    quantize_weight,
    rms_norm_quantize,
    silu_and_mul_quantize,
)
from ..kernels.norm import rms_norm
from ..kernels.weight_only import QuantisedWeight, quantize_int4, quantize_int8, weight_only_linear


class Projections(Protocol):
    """A layer's pieces as the probe pass runs them (LlamaFamilyModel itself, or Fp8Projections); connects the
    weights chosen by a rule's `probe_weights` and the probe's passes."""

    def project_qkv(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [tokens, hidden] -> [tokens, (heads + 2 kv_heads) * head_dim], before the rotation."""

    def finish_layer(self, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP and residual: [tokens, hidden]."""


class Fp8Projections:
    """The model's decoder-layer matrices in FP8 (e4m3, float32 scale per output channel), for the probe pass.

    Made once per model (`for_model`, thread-safe) from every layer's qkv, o, gate_up and down: about half
    the bytes of the model's decoder layers, kept in device memory beside them (Llama-3-8B: ~7 GB). Products
    run on the hardware where kernels/fp8.hardware_fp8 says so, emulated with the same rounding elsewhere.
    Capturable in CUDA graphs (no host synchronisation). Holds the model's norms and biases, not the model
    (so the per-model cache lets a dropped model go)."""

    def __init__(self, model: LlamaFamilyModel) -> None:
        self.eps = model.eps
        self.layers = list(model.layers)  # the model's LayerWeights: norms and the qkv bias, shared
        self.qkv: list[Fp8Weight] = []
        self.o: list[Fp8Weight] = []
        self.gate_up: list[Fp8Weight] = []
        self.down: list[Fp8Weight] = []
        with torch.no_grad():
            for layer in model.layers:
                self.qkv.append(quantize_weight(layer.qkv))
                self.o.append(quantize_weight(layer.o))
                self.gate_up.append(quantize_weight(layer.gate_up))
                self.down.append(quantize_weight(layer.down))

    @classmethod
    def for_model(cls, model: LlamaFamilyModel) -> "Fp8Projections":
        """The model's FP8 copy, made on first use."""
        return _PER_MODEL.get(model)

    def project_qkv(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """As LlamaFamilyModel.project_qkv, the product in FP8 (the norm and the qkv bias as the model's)."""
        weights = self.layers[layer]
        x_fp8, x_scale = rms_norm_quantize(hidden, weights.input_norm, self.eps)
        return fp8_product(x_fp8, x_scale, self.qkv[layer], hidden.dtype, bias=weights.qkv_bias)

    def finish_layer(self, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """As LlamaFamilyModel.finish_layer, the three products in FP8 (residuals added after each; the first
        residual add with the norm after it, the norm and the activation fused with the quantisation of their
        output)."""
        dtype = hidden.dtype
        attended = fp8_linear(attention, self.o[layer])
        hidden, x_fp8, x_scale = add_rms_norm_quantize(attended, hidden, self.layers[layer].post_norm, self.eps)
        gate_up = fp8_product(x_fp8, x_scale, self.gate_up[layer], dtype)
        x_fp8, x_scale = silu_and_mul_quantize(gate_up)
        return fp8_product(x_fp8, x_scale, self.down[layer], dtype, residual=hidden)


class WeightOnlyProjections:
    """The model's decoder-layer matrices with `bits` (8 or 4) a value, for the probe pass; the rows stay in
    the model's dtype (kernels/weight_only.py: int8 with a scale per output channel, or int4 with one per
    output channel and 64 input channels).

    Made once per model and bit width (`for_model`, thread-safe): Llama-3-8B's decoder layers take ~7 GB in
    int8 and ~3.7 GB in int4 beside the model's. On CUDA one Triton launch a product (the weights dequantised
    in registers), the reference elsewhere; capturable in CUDA graphs. Holds the model's norms and biases,
    not the model."""

    def __init__(self, model: LlamaFamilyModel, bits: int) -> None:
        if bits not in (8, 4):
            raise ValueError(f"WeightOnlyProjections takes 8 or 4 bits, got {bits}")
        quantize = quantize_int8 if bits == 8 else quantize_int4
        self.bits = bits
        self.eps = model.eps
        self.layers = list(model.layers)
        self.qkv: list[QuantisedWeight] = []
        self.o: list[QuantisedWeight] = []
        self.gate_up: list[QuantisedWeight] = []
        self.down: list[QuantisedWeight] = []
        with torch.no_grad():
            for layer in model.layers:
                self.qkv.append(quantize(layer.qkv))
                self.o.append(quantize(layer.o))
                self.gate_up.append(quantize(layer.gate_up))
                self.down.append(quantize(layer.down))

    @classmethod
    def for_model(cls, model: LlamaFamilyModel, bits: int) -> "WeightOnlyProjections":
        """The model's copy with `bits` a value, made on first use."""
        return (_PER_MODEL_INT8 if bits == 8 else _PER_MODEL_INT4).get(model)

    def project_qkv(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """As LlamaFamilyModel.project_qkv, the product on the quantised weights."""
        weights = self.layers[layer]
        return weight_only_linear(rms_norm(hidden, weights.input_norm, self.eps), self.qkv[layer],
                                  bias=weights.qkv_bias)

    def finish_layer(self, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """As LlamaFamilyModel.finish_layer, the three products on the quantised weights (each residual added
        after its product)."""
        hidden = weight_only_linear(attention, self.o[layer], residual=hidden)
        x = rms_norm(hidden, self.layers[layer].post_norm, self.eps)
        return weight_only_linear(silu_and_mul(weight_only_linear(x, self.gate_up[layer])), self.down[layer],
                                  residual=hidden)


_PER_MODEL: InstancePerKey[LlamaFamilyModel, Fp8Projections] = InstancePerKey(Fp8Projections)
_PER_MODEL_INT8: InstancePerKey[LlamaFamilyModel, WeightOnlyProjections] = InstancePerKey(
    lambda model: WeightOnlyProjections(model, 8))
_PER_MODEL_INT4: InstancePerKey[LlamaFamilyModel, WeightOnlyProjections] = InstancePerKey(
    lambda model: WeightOnlyProjections(model, 4))


def probe_projections(model: LlamaFamilyModel, probe_weights: str) -> Projections:
    """The projections a probe with `probe_weights` ("auto", "model", "fp8", "int8", "int4";
    SelectionRule.probe_weights) runs on this model. Raises ValueError for another value."""
    if probe_weights == "model":
        return model
    if probe_weights in ("int8", "int4"):
        return WeightOnlyProjections.for_model(model, int(probe_weights[3:]))
    if probe_weights == "fp8" or (probe_weights == "auto" and hardware_fp8(model.device, model.dtype)):
        return Fp8Projections.for_model(model)
    if probe_weights == "auto":
        return model
    raise ValueError(f"probe_weights must be 'auto', 'model', 'fp8', 'int8' or 'int4', got {probe_weights!r}")
