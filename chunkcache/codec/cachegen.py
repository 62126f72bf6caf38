"""`cachegen`: CacheGen's KV encoding (Liu et al., arXiv 2310.07240, Section 5), levels 0..3.

- Token-wise locality: the chunk's tokens are cut into groups of GROUP_TOKENS; each group's first token is its
  anchor, quantised against the channel's mean anchor, and every other token is coded as its delta from the
  group's reconstructed anchor (so errors never add up along the tokens).
- Layer-wise sensitivity: the layers fall into three groups (first, middle, last third); a level gives each
  group its quantisation bins per standard deviation, more for early layers, whose errors the later layers
  carry on. Anchors get ANCHOR_BINS_FACTOR times the bins of their layer group. Where a channel's tokens are
  not alike (values often), coding against the group's anchor would cost more than against the channel's
  centre: each channel takes whichever has the smaller spread.
- Arithmetic coding with per-channel statistics: each (layer, KV head, head_dim index) channel's anchor and
  delta symbols are range-coded with a distribution chosen for that channel (entropy.py).

Bins are never clipped (a channel's bins widen until its largest deviation fits in HALF of them), so every
value's error is at most half its channel's bin width. Per channel and layer group the entry stores 9 bytes
(CacheGenCodec); each layer group's symbols are one range-coder stream, so a reader could take the entry
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
from .quantize import SMALLEST_WIDTH, bf16_toward

GROUP_TOKENS = 10  # tokens per anchor group (the paper's choice)
ANCHOR_BINS_FACTOR = 2
# Quantisation bins per standard deviation of a channel's deltas, for the (first, middle, last) third of the
# layers, by level: a bin is the channel's RMS delta / bins wide.
LEVEL_BINS = ((2.0, 1.4, 1.0), (4.0, 2.8, 2.0), (8.0, 5.6, 4.0), (16.0, 11.2, 8.0))
HALF = 127  # symbols are -HALF..HALF: a channel's bins widen so that its largest deviation fits


def layer_groups(layers: int) -> list[range]:
    """The layers in (at most) three consecutive groups, sizes differing by one at most."""
    bounds = np.linspace(0, layers, min(3, layers) + 1).round().astype(int)
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _quantise(deviation: torch.Tensor, bins: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols and bin widths of deviations [channels, n] (float32): per channel a width of RMS / bins (at
    least the largest deviation / HALF, so nothing is clipped), rounded up to bf16; symbols round to the nearest
    bin, so each value is off by half a width at most."""
    if deviation.shape[1] == 0:
        width = deviation.new_ones(deviation.shape[0], 1)
    else:
        width = torch.maximum(deviation.square().mean(dim=1, keepdim=True).sqrt() / bins,
                              deviation.abs().amax(dim=1, keepdim=True) / HALF)
    width = bf16_toward(width.clamp_min(SMALLEST_WIDTH), 1.0)
    return (deviation / width.float()).round_().clamp_(-HALF, HALF), width


def _positions(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor positions and the others' mask: [anchors] indices, [tokens] bool (False at anchors)."""
    anchors = torch.arange(0, tokens, GROUP_TOKENS)
    others = torch.ones(tokens, dtype=torch.bool)
    others[anchors] = False
    return anchors, others


@register
class CacheGenCodec(KVCodec):
    """Level 0: the smallest; level 3: the most exact (bench/results/codec-*.md: sizes and errors by level).

    Per layer group the parts are: `centre` (each channel's mean anchor), `anchor_width`, `delta_width` (bf16,
    [channels]), `delta` (bool [channels]: its other tokens are coded against their anchor, else against the
    centre, whichever has the smaller spread), `shapes` (uint8 [2 * channels]: the anchors' and the others'
    distribution choices), `halves` (int32 [2]: the anchors' and the others' largest symbol) and `stream` (the
    range coder's words). Channels are (layer, KV head, head_dim index) in that order."""

    name = "cachegen"
    levels = CODEC_LEVELS["cachegen"]  # one per LEVEL_BINS row

    def encode(self, tensor: torch.Tensor) -> Parts:
        layers, heads, tokens, dim = tensor.shape
        values = tensor.detach().float().cpu()
        anchors, others = _positions(tokens)
        parts: Parts = {}
        for group, (layer_range, bins) in enumerate(zip(layer_groups(layers), LEVEL_BINS[self.level])):
            channels = values[layer_range.start:layer_range.stop].permute(0, 1, 3, 2).reshape(-1, tokens)
            anchor = channels[:, anchors]
            centre = anchor.mean(dim=1, keepdim=True).bfloat16()
            anchor_symbols, anchor_width = _quantise(anchor - centre.float(), bins * ANCHOR_BINS_FACTOR)
            reference = (centre.float() + anchor_symbols * anchor_width.float()).repeat_interleave(
                GROUP_TOKENS, dim=1)[:, :tokens][:, others]
            rest = channels[:, others]
            delta = ((rest - reference).square().sum(dim=1, keepdim=True)
                     <= (rest - centre.float()).square().sum(dim=1, keepdim=True))
            delta_symbols, delta_width = _quantise(rest - torch.where(delta, reference, centre.float()), bins)
            # The alphabets only as wide as the symbols used: smaller tables decode faster.
            halves = [max(1, int(symbols.abs().max())) if symbols.numel() else 1
                      for symbols in (anchor_symbols, delta_symbols)]
            encoder = constriction.stream.queue.RangeEncoder()
            anchor_shapes = encode_channels(encoder, anchor_symbols.numpy().astype(np.int32), halves[0])
            delta_shapes = encode_channels(encoder, delta_symbols.numpy().astype(np.int32), halves[1])
            parts.update({f"{group}.centre": centre[:, 0].contiguous(),
                          f"{group}.anchor_width": anchor_width[:, 0].contiguous(),
                          f"{group}.delta_width": delta_width[:, 0].contiguous(),
                          f"{group}.delta": delta[:, 0].contiguous(),
                          f"{group}.halves": torch.tensor(halves, dtype=torch.int32),
                          f"{group}.shapes": torch.from_numpy(np.concatenate([anchor_shapes, delta_shapes])),
                          f"{group}.stream": torch.from_numpy(encoder.get_compressed().view(np.int32).copy())})
        return parts

    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        layers, heads, tokens, dim = layout.shape
        anchors, others = _positions(tokens)
        slabs = []
        for group, layer_range in enumerate(layer_groups(layers)):
            count = len(layer_range) * heads * dim
            shapes = parts[f"{group}.shapes"].numpy()
            halves = parts[f"{group}.halves"].tolist()
            if shapes.shape != (2 * count,) or len(halves) != 2 or not all(1 <= half <= HALF for half in halves):
                raise ValueError("distribution choices do not fit the layout")
            decoder = constriction.stream.queue.RangeDecoder(parts[f"{group}.stream"].numpy().view(np.uint32))
            anchor_symbols = decode_channels(decoder, shapes[:count], len(anchors), halves[0])
            delta_symbols = decode_channels(decoder, shapes[count:], tokens - len(anchors), halves[1])
            channel_parts = [parts[f"{group}.{name}"].to(device).reshape(count, 1)
                             for name in ("centre", "anchor_width", "delta_width", "delta")]
            slabs.append(dequantise(torch.from_numpy(anchor_symbols).to(device),
                                    torch.from_numpy(delta_symbols).to(device), *channel_parts, others.to(device))
                         .reshape(len(layer_range), heads, dim, tokens))
        return torch.cat(slabs).permute(0, 1, 3, 2).to(layout.torch_dtype).contiguous()


def dequantise(anchor_symbols: torch.Tensor, delta_symbols: torch.Tensor, centre: torch.Tensor,
               anchor_width: torch.Tensor, delta_width: torch.Tensor, delta: torch.Tensor,
               others: torch.Tensor) -> torch.Tensor:
    """Channels' values from their symbols, on the symbols' device: [channels, tokens] float32.

    anchor_symbols [channels, anchors], delta_symbols [channels, tokens - anchors] (integers); centre and the
    widths [channels, 1] (bf16); delta [channels, 1] bool (others against their anchor, else the centre);
    others [tokens] bool, False at anchor positions."""
    centre = centre.float()
    anchor = centre + anchor_symbols.float() * anchor_width.float()
    values = anchor.repeat_interleave(GROUP_TOKENS, dim=1)[:, :others.shape[0]].clone()
    reference = torch.where(delta, values[:, others], centre)
    values[:, others] = reference + delta_symbols.float() * delta_width.float()
    return values
