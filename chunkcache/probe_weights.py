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


_PER_MODEL: InstancePerKey[LlamaFamilyModel, Fp8Projections] = InstancePerKey(Fp8Projections)


def probe_projections(model: LlamaFamilyModel, probe_weights: str) -> Projections:
    """The projections a probe with `probe_weights` ("auto", "model", "fp8"; SelectionRule.probe_weights)
    runs on this model. Raises ValueError for another value."""
    if probe_weights == "model":
        return model
    if probe_weights == "fp8" or (probe_weights == "auto" and hardware_fp8(model.device, model.dtype)):
        return Fp8Projections.for_model(model)
    if probe_weights == "auto":
        return model
    raise ValueError(f"probe_weights must be 'auto', 'model' or 'fp8', got {probe_weights!r}")
