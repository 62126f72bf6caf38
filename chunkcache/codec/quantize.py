"""`int8` and `int4`: per-channel uniform quantisers, the baselines the CacheGen codec is measured against.

Each channel (layer, KV head, head_dim index) of keys and of values gets its own offset (its minimum over the
chunk's tokens, rounded down to bf16) and bin width ((maximum - offset) / (2^bits - 1), rounded up to bf16), as
KIVI quantises keys per channel. A value's error is at most half its channel's bin width. int4 packs two values
per byte.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..defaults import CODEC_LEVELS
from .base import ChannelWeights, KVCodec, KVKind, KVLayout, Parts, register

SMALLEST_WIDTH = 2.0 ** -24  # a constant channel still gets a positive bin width


def bf16_toward(values: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 `values` as bf16 (2 bytes a parameter), rounded toward +inf (direction > 0) or -inf (< 0)."""
    rounded = values.bfloat16()
    missed = rounded.float() < values if direction > 0 else rounded.float() > values
    return torch.where(missed, torch.nextafter(rounded, torch.full_like(rounded, direction * float("inf"))), rounded)


def channel_range(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of a [layers, kv_heads, tokens, head_dim] tensor: minimum and maximum over the tokens,
    float32, [layers, kv_heads, 1, head_dim]."""
    values = tensor.float()
    return values.amin(dim=2, keepdim=True), values.amax(dim=2, keepdim=True)


class ChannelQuantizer(KVCodec):
    """Asymmetric per-channel quantisation to `bits` bits."""

    bits: ClassVar[int]
    def encode(self, tensor: torch.Tensor, kind: KVKind, weights: ChannelWeights | None = None) -> Parts:
        low, high = channel_range(tensor)
        top = (1 << self.bits) - 1
        low = bf16_toward(low, -1.0)
        width = bf16_toward(((high - low.float()) / top).clamp_min(SMALLEST_WIDTH), 1.0)
        codes = ((tensor.float() - low.float()) / width.float()).round_().clamp_(0, top).to(torch.uint8).cpu()
        if self.bits == 4:
            codes = pack_nibbles(codes.flatten())
        return {"offset": low.cpu(), "width": width.cpu(), "codes": codes}

    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        channels = (layout.layers, layout.kv_heads, 1, layout.head_dim)
        offset, width = parts["offset"].to(device), parts["width"].to(device)
        if offset.shape != channels or width.shape != channels:
            raise ValueError("per-channel parameters do not fit the layout")
        codes = parts["codes"].to(device)
        if self.bits == 4:
            codes = unpack_nibbles(codes, value_count(layout))
        codes = codes.reshape(layout.shape)
        return (codes.float() * width.float() + offset.float()).to(layout.torch_dtype)


def value_count(layout: KVLayout) -> int:
    """Values in one KV tensor of `layout`."""
    layers, heads, tokens, dim = layout.shape
    return layers * heads * tokens * dim


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [n] -> [ceil(n / 2)] bytes, the first of each pair in the low nibble."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The inverse of pack_nibbles: the first `count` codes; ValueError when `packed` is not that long."""
    if packed.numel() != (count + 1) // 2:
        raise ValueError("packed codes do not fit the layout")
    return torch.stack([packed & 15, packed >> 4], dim=1).flatten()[:count]


@register
class Int8Codec(ChannelQuantizer):
    """8 bits per value (plus 4 bytes per channel): about 2x smaller than bf16."""

    name = "int8"
    levels = CODEC_LEVELS["int8"]
    bits = 8


@register
class Int4Codec(ChannelQuantizer):
    """4 bits per value (plus 4 bytes per channel): about 4x smaller than bf16."""

    name = "int4"
    levels = CODEC_LEVELS["int4"]
    bits = 4
