"""`cachegen`: CacheGen's KV encoding (Liu et al., arXiv 2310.07240, Section 5), levels 0..3.

- Token-wise locality: the chunk's tokens are cut into groups of GROUP_TOKENS; each group's first token is its
  anchor, quantised against the channel's mean anchor, and every other token is coded as its delta from the
  group's reconstructed anchor (so errors never add up along the tokens).
- Layer-wise sensitivity: the layers fall into three groups (first, middle, last third); a level gives each
  group its number of quantisation bins, more for early layers, whose errors the later layers carry on.
  Anchors get ANCHOR_BINS_FACTOR times the bins of their layer group.
- Arithmetic coding with per-channel statistics: each (layer, KV head, head_dim index) channel's anchor and
  delta symbols are range-coded with a distribution chosen for that channel (entropy.py).

Bins span a channel's largest deviation, so every value's error is at most half its channel's bin width.
Per channel and layer group the entry stores the mean anchor, two bin widths (float32) and two distribution
choices (bytes); each layer group's symbols are one range-coder stream, so a reader could take the entry
layer group by layer group. Entropy coding runs on the host (numpy, constriction); dequantisation in torch on
the device decoding asks for. GPU entropy decoding is not here.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from ..defaults import CODEC_LEVELS
from .base import KVCodec, KVLayout, Parts, register
from .entropy import decode_channels, encode_channels
from .quantize import SMALLEST_WIDTH

GROUP_TOKENS = 10  # tokens per anchor group (the paper's choice)
ANCHOR_BINS_FACTOR = 2
# Quantisation bins of deltas for the (first, middle, last) third of the layers, by level.
LEVEL_BINS = ((8, 6, 4), (16, 12, 8), (32, 24, 16), (64, 48, 32))


def layer_groups(layers: int) -> list[range]:
    """The layers in (at most) three consecutive groups, sizes differing by one at most."""
    bounds = np.linspace(0, layers, min(3, layers) + 1).round().astype(int)
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _widths(deviation: torch.Tensor, half: int) -> torch.Tensor:
    """Per channel: the bin width that spans `deviation` ([channels], float32) with `half` bins each side."""
    return (deviation / half).clamp_min(SMALLEST_WIDTH)


def _anchor_positions(tokens: int) -> torch.Tensor:
    return torch.arange(0, tokens, GROUP_TOKENS)


@register
class CacheGenCodec(KVCodec):
    """Level 0: the smallest (about 2 bits per value with SmolLM2's KV); level 3: the most exact."""

    name = "cachegen"
    levels = CODEC_LEVELS["cachegen"]  # one per LEVEL_BINS row

    def encode(self, tensor: torch.Tensor) -> Parts:
        layers, heads, tokens, dim = tensor.shape
        values = tensor.detach().float().cpu()
        anchors = _anchor_positions(tokens)
        others = torch.ones(tokens, dtype=torch.bool)
        others[anchors] = False
        parts: Parts = {}
        for group, (layer_range, bins) in enumerate(zip(layer_groups(layers), LEVEL_BINS[self.level])):
            half, anchor_half = bins // 2, bins // 2 * ANCHOR_BINS_FACTOR
            channels = values[layer_range.start:layer_range.stop].permute(0, 1, 3, 2).reshape(-1, tokens)
            anchor = channels[:, anchors]
            centre = anchor.mean(dim=1, keepdim=True)
            anchor_width = _widths((anchor - centre).abs().amax(dim=1), anchor_half)[:, None]
            anchor_symbols = ((anchor - centre) / anchor_width).round_().clamp_(-anchor_half, anchor_half)
            reference = (centre + anchor_symbols * anchor_width).repeat_interleave(GROUP_TOKENS, dim=1)[:, :tokens]
            delta = (channels - reference)[:, others]
            delta_width = _widths(delta.abs().amax(dim=1) if delta.shape[1] else delta.new_zeros(len(delta)),
                                  half)[:, None]
            delta_symbols = (delta / delta_width).round_().clamp_(-half, half)
            encoder = constriction.stream.queue.RangeEncoder()
            anchor_shapes = encode_channels(encoder, anchor_symbols.numpy().astype(np.int32), anchor_half)
            delta_shapes = encode_channels(encoder, delta_symbols.numpy().astype(np.int32), half)
            parts.update({f"{group}.centre": centre[:, 0].contiguous(),
                          f"{group}.anchor_width": anchor_width[:, 0].contiguous(),
                          f"{group}.delta_width": delta_width[:, 0].contiguous(),
                          f"{group}.shapes": torch.from_numpy(np.concatenate([anchor_shapes, delta_shapes])),
                          f"{group}.stream": torch.from_numpy(encoder.get_compressed().view(np.int32).copy())})
        return parts

    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        layers, heads, tokens, dim = layout.shape
        anchors = _anchor_positions(tokens)
        others = torch.ones(tokens, dtype=torch.bool)
        others[anchors] = False
        slabs = []
        for group, (layer_range, bins) in enumerate(zip(layer_groups(layers), LEVEL_BINS[self.level])):
            half, anchor_half = bins // 2, bins // 2 * ANCHOR_BINS_FACTOR
            count = len(layer_range) * heads * dim
            shapes = parts[f"{group}.shapes"].numpy()
            if shapes.shape != (2 * count,):
                raise ValueError("distribution choices do not fit the layout")
            decoder = constriction.stream.queue.RangeDecoder(parts[f"{group}.stream"].numpy().view(np.uint32))
            anchor_symbols = decode_channels(decoder, shapes[:count], len(anchors), anchor_half)
            delta_symbols = decode_channels(decoder, shapes[count:], tokens - len(anchors), half)
            slabs.append(dequantise(torch.from_numpy(anchor_symbols).to(device),
                                    torch.from_numpy(delta_symbols).to(device),
                                    *(parts[f"{group}.{name}"].to(device).reshape(count, 1)
                                      for name in ("centre", "anchor_width", "delta_width")),
                                    others.to(device)).reshape(len(layer_range), heads, dim, tokens))
        return torch.cat(slabs).permute(0, 1, 3, 2).to(layout.torch_dtype).contiguous()


def dequantise(anchor_symbols: torch.Tensor, delta_symbols: torch.Tensor, centre: torch.Tensor,
               anchor_width: torch.Tensor, delta_width: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Channels' values from their symbols, on the symbols' device: [channels, tokens] float32.

    anchor_symbols [channels, anchors], delta_symbols [channels, tokens - anchors] (integers); centre and the
    widths [channels, 1] float32; others [tokens] bool, False at anchor positions."""
    anchor = centre + anchor_symbols.float() * anchor_width
    tokens = others.shape[0]
    values = anchor.repeat_interleave(GROUP_TOKENS, dim=1)[:, :tokens].clone()
    values[:, others] += delta_symbols.float() * delta_width
    return values
