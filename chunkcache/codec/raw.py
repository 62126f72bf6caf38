"""`raw`: the tensor as it is (bf16, fp16 or fp32), the chunk cache's default and the format of entries written
before codecs existed (their keys and values tensors are this codec's parts)."""

from __future__ import annotations

import torch

from ..defaults import CODEC_LEVELS
from .base import ChannelWeights, KVCodec, KVKind, KVLayout, Parts, register


@register
class RawCodec(KVCodec):
    """Exact: the tensor itself, 2 bytes per value in bf16."""

    name = "raw"
    levels = CODEC_LEVELS["raw"]

    def encode(self, tensor: torch.Tensor, kind: KVKind, weights: ChannelWeights | None = None) -> Parts:
        return {"": tensor.cpu().contiguous()}

    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        return parts[""].to(device)
