"""`cachegen`: CacheGen's KV encoding (Liu et al., arXiv 2310.07240, Section 5), levels 0..3.

- Token-wise locality: the chunk's tokens are cut into groups of GROUP_TOKENS; each group's first token is its
  anchor, quantised against the channel's mean anchor, and every other token is coded as its delta from the
  group's reconstructed anchor (so errors never add up along the tokens).
- Layer-wise sensitivity: a level gives keys and values each a ladder of quantisation bins per standard deviation
  over consecutive slices of the layers (LEVEL_BINS: LevelBins; on blended SmolLM2 keys want more bins in later
  layers and values in earlier ones). Anchors of channels coded against them get ANCHOR_BINS_FACTOR times the
  bins of their layer. The streams fall into three layer groups (first, middle, last third). Where a
  channel's tokens are not alike (values often), coding against the group's anchor would cost more than against
  the channel's centre: each channel takes whichever has the smaller spread.
- Channel-wise sensitivity (keys; issue 21): given the chunk's ChannelWeights (ChunkKV.weights, the RoPE pair's
  query energy measured on the chunk's own queries: chunkcache/channel_weights.py), a key channel's bins are its
  layer's times sqrt(weight / the layer's geometric mean weight), within MAX_BIN_SCALE either way (bin_scales):
  heavy channels, where an error moves the attention logits most, get narrower bins, the others wider, at about
  the same bytes. The widths travel in the entry as before, so the decoder needs nothing new. Without weights
  (an entry re-encoded from bytes) every channel of a layer slice takes the ladder's bins. Values are quantised
  per channel only: dividing each value row by a per-token scale first (KIVI, arXiv 2402.02750, quantises values
  per token), by its RMS or by the attention the chunk's own queries pay to the token, blended SmolLM2 no better
  at equal bytes (bench/results/codec-2026-11-30.md, "Per-token value scales").
- Arithmetic coding with per-channel statistics: each (layer, KV head, head_dim index) channel's anchor and
  delta symbols are entropy-coded with a distribution chosen for that channel (entropy.py), by interleaved rANS
  (rans.py) in many independent lanes, so a GPU decodes them in parallel (kernels/rans.py).

The first token of every entry (the level's `sink_tokens` leading tokens) is stored as it was (in the KV's
dtype), and the streams code a copy of the next token in its place, so that its outlying values widen no
channel's bins: the entry that begins a prompt (the system prompt's) holds the attention sink, which nearly every
query attends to, so an error there moves the output far more than anywhere else (KVQuant, arXiv 2401.18079,
keeps the first token in fp16 likewise). On SmolLM2, blending from values quantised at 1 bin per standard
deviation in the later two thirds gave 16 times the KL against full prefill that the same values with the first
token kept gave (bench/results/codec-2026-11-30.md).

Bins are never clipped (a channel's bins widen until its largest deviation fits in HALF of them), so every
value's error is at most half its channel's bin width. Per channel the entry stores about 5.1 bytes
(CacheGenCodec: a centre, a bin width as an 8-bit code on a log scale of WIDTH_STEPS per octave, two
distribution choices, a bit for the anchor choice, and an anchors' width code only where the channel is coded
against its anchors); each layer group's symbols are streams of their own, so a reader could take the entry
layer group by layer group. Encoding runs on the host (torch, numpy). Decoding runs on the device asked for:
on CUDA one Triton kernel decodes the rANS streams and dequantises straight into
the KV tensor, elsewhere numpy decodes the streams and torch dequantises (kernels/rans.py). The encoder's
quantisation is one step (`quantise`: a QuantisedGroup per layer group) whose symbols go either to the entropy
coder (`encode`) or, for `round_trip` (what a stored entry decodes to, bit for bit: the blend quality benchmark's),
straight to the decoders' dequantisation, skipping the entropy coding, which is lossless.

Entries record their format (the `format` part, FORMAT): entries of format 1 (range-coded with constriction on
the host before the rANS coder existed), of format 2 (9 bytes per channel: both bin widths and a byte for the
anchor choice, for every channel) and of format 3 (bin widths in bf16) are refused (a miss: recomputed), as is any
other format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ...kernels import rans as decoders
from ..defaults import CODEC_LEVELS
from . import entropy, rans
from .base import ChannelWeights, KVCodec, KVKind, KVLayout, Parts, register
from .quantize import SMALLEST_WIDTH

GROUP_TOKENS = 10  # tokens per anchor group (the paper's choice)
ANCHOR_BINS_FACTOR = 2


@dataclass(frozen=True)
class LevelBins:
    """One level's quantisation, from the level table (LEVEL_BINS) to the encoder: bins per standard deviation of
    a channel's deltas for keys and for values, each a ladder over consecutive equal slices of the layers (three
    entries: a third each; a layer takes its slice's bins, so a bin is the channel's RMS delta / bins wide), and
    the leading tokens stored as they were (`sink_tokens`, at least 1: the attention sink)."""

    keys: tuple[float, ...]
    values: tuple[float, ...]
    sink_tokens: int = 1

    def ladder(self, kind: KVKind) -> tuple[float, ...]:
        return self.keys if kind == "keys" else self.values


# By level. Level 0's keys and values take opposite ladders (bench/results/codec-2026-11-30.md, "format 4"):
# blending SmolLM2 from KV moved the output far more with the last third's keys coarse than with the first
# third's, and values were cheaper to coarsen in the later layers; at 6.5x it blended with half the KL of format
# 3's level 0 (the same ladder for both, 0.6/0.9/1.3) at 3% fewer bytes. Keys' first third below 0.7 bins blew
# some questions up (KL > 2). Levels 1-3 keep format 3's ladders, one for keys and values alike.
LEVEL_BINS = (LevelBins((0.7, 1.0, 1.4), (1.0, 0.7, 0.5)), LevelBins((1.4, 2.0, 2.8), (1.4, 2.0, 2.8)),
              LevelBins((2.8, 4.0, 5.6), (2.8, 4.0, 5.6)), LevelBins((8.0, 11.2, 16.0), (8.0, 11.2, 16.0)))
FORMAT = 4  # the entries' format: 4, bin widths as 8-bit codes (1, 2 and 3 are no longer read)
WIDTH_STEPS = 8  # width codes per octave: a width is 2^((code + base) / WIDTH_STEPS), within 4.5% of the one wanted
HALF = 127  # symbols are -HALF..HALF: a channel's bins widen so that its largest deviation fits
# Key channels' bins follow their weights (bin_scales) within this factor of their layer's either way: at 4 the
# clamp held many channels and blended SmolLM2 worse; at 8 and 16 the same (bench/results/codec-2026-11-30.md).
MAX_BIN_SCALE = 8.0
CENTRING_STEPS = 8  # bin_scales' re-centring after the clamp (a layer's mean log factor then within 3% of 0)


@dataclass(frozen=True)
class QuantisedGroup:
    """One layer group of one KV tensor, quantised: connects the encoder's quantisation (CacheGenCodec.quantise)
    and its two consumers, the entropy coder (`encode`: the entry's parts) and the fast round trip (`round_trip`:
    dequantised at once). `channels` = layers * kv_heads * head_dim of the group, (layer, KV head, head_dim index)
    in that order; all tensors on the host."""

    layers: int  # consecutive layers, after the previous groups'
    # int16 [channels, tokens] in -HALF..HALF: anchors against the centre, the others against their anchor's
    # reconstruction where `delta`, else against the centre
    symbols: torch.Tensor
    centre: torch.Tensor  # bf16 [channels]: the mean anchor where `delta`, else the mean token
    anchor_width: torch.Tensor  # uint8 [channels]: the anchors' width code (widths_of)
    width: torch.Tensor  # uint8 [channels]: the other tokens' width code (the anchors' too where not `delta`)
    delta: torch.Tensor  # bool [channels]: the other tokens are coded against their anchor, else the centre
    base: int  # the width codes' base (width_base)
    first: torch.Tensor  # [channels * sinks] of the KV's dtype, channel-major: the leading tokens as they were


def layer_bins(ladder: tuple[float, ...], layers: int) -> torch.Tensor:
    """Bins per standard deviation of each layer, float32 [layers]: layer i takes the ladder's entry
    floor(i * len(ladder) / layers)."""
    return torch.tensor([ladder[i * len(ladder) // layers] for i in range(layers)], dtype=torch.float32)


def layer_groups(layers: int) -> list[range]:
    """The layers in (at most) three consecutive groups, sizes differing by one at most."""
    bounds = np.linspace(0, layers, min(3, layers) + 1).round().astype(int)
    return [range(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


def _width(deviation: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """The bin width a channel wants, float32 [channels, 1], for deviations [channels, n] (float32) at `bins`
    [channels, 1] per standard deviation: its RMS / bins, at least the largest deviation / HALF (so nothing is
    clipped); 1 for channels without tokens."""
    if deviation.shape[1] == 0:
        return deviation.new_ones(deviation.shape[0], 1)
    return torch.maximum(deviation.square().mean(dim=1, keepdim=True).sqrt() / bins,
                         deviation.abs().amax(dim=1, keepdim=True) / HALF).clamp_min(SMALLEST_WIDTH)


def width_base(channels: torch.Tensor, bins: torch.Tensor) -> int:
    """A layer group's width code base (WidthCodes): the codes' top, 255, reaches twice the widest range of its
    channels [channels, tokens] per the fewest bins (a bound on every width the group wants). The range counts
    the centres' rounding to bf16 (2^-9 of a value at most): a channel whose tokens are all alike still
    deviates from its bf16 centre by that much, and its bins must reach it."""
    if not channels.numel():
        spread = channels.new_zeros(())
    else:
        spread = (channels.amax(dim=1) - channels.amin(dim=1)).max() + channels.abs().max() * 2.0 ** -8
    top = max(2 * float(spread) / min(1.0, float(bins.min())), SMALLEST_WIDTH)
    return int(np.ceil(np.log2(top) * WIDTH_STEPS)) - 255


def widths_of(codes: torch.Tensor, base: int) -> torch.Tensor:
    """Bin widths, bf16, of 8-bit width codes (uint8, any shape) above `base`: 2^((code + base) / WIDTH_STEPS).
    The encoder takes its widths from here too, so both sides agree to the bit."""
    return torch.exp2((codes.to(torch.float64) + base) / WIDTH_STEPS).float().bfloat16()


def _quantise(deviation: torch.Tensor, bins: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols and width codes (uint8 [channels, 1]) of deviations [channels, n] (float32) at `bins` [channels, 1]
    per standard deviation: the code nearest the width wanted (_width), raised until nothing is clipped; symbols
    round to the nearest bin, so each value is off by half its width (widths_of) at most."""
    wanted = _width(deviation, bins)
    codes = ((wanted.log2() * WIDTH_STEPS).round() - base).clamp(0, 255)
    largest = deviation.abs().amax(dim=1, keepdim=True) if deviation.shape[1] else torch.zeros_like(wanted)
    for _ in range(2):  # a code's rounding down, then bf16's, may leave the largest deviation past HALF bins
        codes = torch.where(widths_of(codes, base).float() * HALF < largest, (codes + 1).clamp(max=255), codes)
    codes = codes.to(torch.uint8)
    return (deviation / widths_of(codes, base).float()).round_().clamp_(-HALF, HALF), codes


def bin_scales(weights: torch.Tensor) -> torch.Tensor:
    """Each key channel's factor on its layer's bins per standard deviation, float32 [layers * kv_heads *
    head_dim] on the host in channel order, from the channels' weights [layers, kv_heads, head_dim]
    (ChannelWeights.keys, any device): sqrt(weight / the layer's geometric mean weight), clamped to
    MAX_BIN_SCALE either way. A channel's squared error is its bin width squared / 12 times its weight; at equal
    total rate (the sum over channels of log(spread / width)) the weighted error is least when weight * width^2
    is the same for every channel (reverse water-filling's rule at high rate). The factor divides the width the
    ladder gives (the channel's spread / its layer's bins) by sqrt(weight), keeping the layer's mean log width
    (up to the clamp), hence about its bytes; widths by 1 / sqrt(weight) alone, whatever the spread, blended
    SmolLM2 no better (bench/results/codec-2026-11-30.md, "Sensitivity-weighted key bins")."""
    layers = weights.shape[0]
    flat = weights.detach().float().cpu().reshape(layers, -1)
    floor = (flat.amax(dim=1, keepdim=True) * 1e-12).clamp_min(torch.finfo(torch.float32).tiny)  # zero weights
    log = 0.5 * flat.clamp_min(floor).log()
    bound = float(np.log(MAX_BIN_SCALE))
    shift = log.mean(dim=1, keepdim=True)
    for _ in range(CENTRING_STEPS):  # the clamp moves the mean: shift until the clamped logs' mean is 0 again
        shift = shift + (log - shift).clamp(-bound, bound).mean(dim=1, keepdim=True)
    return (log - shift).clamp(-bound, bound).exp().reshape(-1)


def _positions(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor positions and the others' mask: [anchors] indices, [tokens] bool (False at anchors)."""
    anchors = torch.arange(0, tokens, GROUP_TOKENS)
    others = torch.ones(tokens, dtype=torch.bool)
    others[anchors] = False
    return anchors, others


@register
class CacheGenCodec(KVCodec):
    """Level 0: the smallest; level 3: the most exact (bench/results/codec-*.md: sizes and errors by level).

    Parts: `format` (int32 [1]: FORMAT) and per layer group `first` ([channels * sinks] of the KV's dtype,
    channel-major: the leading tokens as they were, sinks = min(tokens, the level's sink_tokens); the reader
    takes the count from the size), `delta` (uint8 [ceil(channels / 8)], a bit per channel, numpy's little
    bit order: its other tokens are coded against their anchor, else all its tokens against the centre,
    whichever has the smaller spread), `centre` (bf16 [channels]: the mean anchor where
    `delta`, else the mean token), `width` (uint8 [channels]: the code of the other tokens' bin width, and the
    anchors' where not `delta`: widths_of), `anchor_width` (uint8, one per `delta` channel in channel order: the
    anchors' width code), `base` (int32 [1]: the width codes' base), `shapes` (uint8 [2 * channels]: the
    anchors' and the others' distribution choices), `halves` (int32 [2]: the anchors' and the others' largest
    symbol) and the rANS streams `words` (int16 bits of uint16 words), `offsets`
    (int32) and `states` (int32 bits of uint32) (kernels/rans.py: GroupStreams). Channels are (layer, KV head,
    head_dim index) in that order."""

    name = "cachegen"
    levels = CODEC_LEVELS["cachegen"]  # one per LEVEL_BINS row
    decodes_on_device = True
    uses_channel_weights = True

    def encode(self, tensor: torch.Tensor, kind: KVKind, weights: ChannelWeights | None = None) -> Parts:
        parts: Parts = {"format": torch.tensor([FORMAT], dtype=torch.int32)}
        for group, quantised in enumerate(self.quantise(tensor, kind, weights)):
            anchors, others = _positions(quantised.symbols.shape[1])
            anchor_symbols, delta_symbols = quantised.symbols[:, anchors], quantised.symbols[:, others]
            # The alphabets only as wide as the symbols used: the quantised tables spend less on unused symbols.
            halves = [max(1, int(symbols.abs().max())) if symbols.numel() else 1
                      for symbols in (anchor_symbols, delta_symbols)]
            shapes = np.stack([entropy.choose_shapes(anchor_symbols.numpy().astype(np.int64), halves[0]),
                               entropy.choose_shapes(delta_symbols.numpy().astype(np.int64), halves[1])])
            streams = rans.encode(quantised.symbols.numpy().astype(np.int64), shapes,
                                  tuple(entropy.frequencies(half) for half in halves),
                                  tuple(entropy.cumulative(half) for half in halves), GROUP_TOKENS)
            delta = quantised.delta
            parts.update({f"{group}.first": quantised.first,
                          f"{group}.centre": quantised.centre,
                          f"{group}.width": quantised.width,
                          f"{group}.anchor_width": quantised.anchor_width[delta].contiguous(),
                          f"{group}.delta": torch.from_numpy(np.packbits(delta.numpy(), bitorder="little")),
                          f"{group}.halves": torch.tensor(halves, dtype=torch.int32),
                          f"{group}.base": torch.tensor([quantised.base], dtype=torch.int32),
                          f"{group}.shapes": torch.from_numpy(shapes.reshape(-1)),
                          f"{group}.words": torch.from_numpy(streams.words.view(np.int16).copy()),
                          f"{group}.offsets": torch.from_numpy(streams.offsets),
                          f"{group}.states": torch.from_numpy(streams.states.view(np.int32).copy())})
        return parts

    def quantise(self, tensor: torch.Tensor, kind: KVKind, weights: ChannelWeights | None = None
                 ) -> list[QuantisedGroup]:
        """The encoder's quantisation of one KV tensor [layers, kv_heads, tokens, head_dim] (any device, a dtype
        of DTYPES), keys or values (`kind`), layer group by layer group (layer_groups): what `encode` entropy-codes
        and `round_trip` dequantises."""
        layers, heads, tokens, dim = tensor.shape
        level = LEVEL_BINS[self.level]
        sinks = min(tokens, level.sink_tokens)
        values = tensor.detach().float().cpu().clone()  # a float32 host tensor would be the caller's own
        if sinks < tokens:  # the sinks' own values are stored apart: the streams code the next token in their place
            values[:, :, :sinks] = values[:, :, sinks:sinks + 1]
        per_channel = layer_bins(level.ladder(kind), layers).repeat_interleave(heads * dim)[:, None]
        if weights is not None and kind == "keys":
            if weights.keys.shape != (layers, heads, dim):
                raise ValueError(f"key channel weights of shape {tuple(weights.keys.shape)} do not fit keys of "
                                 f"shape {tuple(tensor.shape)}")
            per_channel = per_channel * bin_scales(weights.keys)[:, None]
        anchors, others = _positions(tokens)
        groups = []
        for layer_range in layer_groups(layers):
            channels = values[layer_range.start:layer_range.stop].permute(0, 1, 3, 2).reshape(-1, tokens)
            bins = per_channel[layer_range.start * heads * dim:layer_range.stop * heads * dim]
            base = width_base(channels, bins)
            anchor = channels[:, anchors]
            centre = anchor.mean(dim=1, keepdim=True).bfloat16()
            anchor_symbols, anchor_width = _quantise(anchor - centre.float(), bins * ANCHOR_BINS_FACTOR, base)
            reference = (centre.float() + anchor_symbols * widths_of(anchor_width, base).float()).repeat_interleave(
                GROUP_TOKENS, dim=1)[:, :tokens][:, others]
            rest = channels[:, others]
            delta = ((rest - reference).square().sum(dim=1, keepdim=True)
                     <= (rest - centre.float()).square().sum(dim=1, keepdim=True))
            delta_symbols, delta_width = _quantise(rest - reference, bins, base)
            # A channel not coded against its anchors codes all its tokens alike, against the mean of all of them:
            # its anchors then need no finer bins than its other tokens (which would cost a bit more each).
            plain_centre = channels.mean(dim=1, keepdim=True).bfloat16()
            plain_symbols, plain_width = _quantise(channels - plain_centre.float(), bins, base)
            symbols = torch.empty(channels.shape, dtype=torch.int16)
            symbols[:, anchors] = torch.where(delta, anchor_symbols, plain_symbols[:, anchors]).to(torch.int16)
            symbols[:, others] = torch.where(delta, delta_symbols, plain_symbols[:, others]).to(torch.int16)
            first = tensor.detach()[layer_range.start:layer_range.stop, :, :sinks].permute(0, 1, 3, 2).reshape(-1)
            groups.append(QuantisedGroup(
                len(layer_range), symbols, torch.where(delta, centre, plain_centre)[:, 0].contiguous(),
                torch.where(delta, anchor_width, plain_width)[:, 0].contiguous(),
                torch.where(delta, delta_width, plain_width)[:, 0].contiguous(), delta[:, 0].contiguous(), base,
                first.cpu().contiguous()))
        return groups

    def round_trip(self, tensor: torch.Tensor, kind: KVKind, device: torch.device,
                   weights: ChannelWeights | None = None) -> torch.Tensor:
        """What decode(encode(tensor, kind), layout, device) gives, bit for bit, without the entropy coding (which
        is lossless): the encoder's symbols dequantised by the decoders' own arithmetic
        (kernels/rans.py: dequantise_reference, on the host), the leading tokens as they were."""
        _, heads, tokens, dim = tensor.shape
        sinks = min(tokens, LEVEL_BINS[self.level].sink_tokens)
        slabs, firsts = [], []
        for quantised in self.quantise(tensor, kind, weights):
            channels = quantised.symbols.shape[0]
            parameters = decoders.GroupStreams(  # the dequantisation's parameters; no streams to decode
                quantised.layers, torch.empty(0, dtype=torch.int16), torch.zeros(1, dtype=torch.int32),
                torch.empty(0, dtype=torch.int32), torch.empty(2, 0, decoders.PROB_SCALE, dtype=torch.int32),
                torch.zeros(2, channels, dtype=torch.uint8), quantised.centre,
                widths_of(quantised.anchor_width, quantised.base), widths_of(quantised.width, quantised.base),
                quantised.delta)
            values = decoders.dequantise_reference(quantised.symbols, parameters, GROUP_TOKENS)
            slabs.append(values.reshape(quantised.layers, heads, dim, tokens).permute(0, 1, 3, 2).to(tensor.dtype))
            firsts.append(quantised.first.reshape(quantised.layers, heads, dim, sinks).permute(0, 1, 3, 2))
        output = torch.cat(slabs).contiguous()
        if sinks:  # the leading tokens as they were
            output[:, :, :sinks] = torch.cat(firsts)
        return output.to(device)

    def decode(self, parts: Parts, layout: KVLayout, device: torch.device) -> torch.Tensor:
        return self.decode_all([parts], layout, device)[0]

    def decode_all(self, tensors: list[Parts], layout: KVLayout, device: torch.device) -> list[torch.Tensor]:
        """All tensors' layer groups in one decoder call (on CUDA one launch: the keys' and values' lanes decode
        side by side), split after."""
        layers, heads, tokens, dim = layout.shape
        groups, firsts = [], []
        for parts in tensors:
            if parts.get("format") is None or parts["format"].tolist() != [FORMAT]:
                raise ValueError(f"not a cachegen entry of format {FORMAT}")
            sinks = parts["0.first"].numel() // max(1, len(layer_groups(layers)[0]) * heads * dim) if layers else 0
            if not (min(tokens, 1) <= sinks <= tokens):
                raise ValueError("the leading tokens kept do not fit the layout")
            kept = []
            for group, layer_range in enumerate(layer_groups(layers)):
                groups.append(self._group(parts, group, len(layer_range), heads * dim, device))
                first = parts[f"{group}.first"]
                if first.dtype != layout.torch_dtype or first.numel() != len(layer_range) * heads * dim * sinks:
                    raise ValueError("the leading tokens' values do not fit the layout")
                kept.append(first.reshape(len(layer_range), heads, dim, sinks))
            firsts.append(torch.cat(kept).permute(0, 1, 3, 2) if layers else None)
        decoded = decoders.decode(groups, heads, tokens, dim, GROUP_TOKENS, layout.torch_dtype, device)
        outputs = list(decoded.split(layers)) if tensors else []
        for output, first in zip(outputs, firsts):  # the leading tokens as they were
            if first is not None and first.shape[2]:
                output[:, :, :first.shape[2]] = first.to(device)
        return outputs

    @staticmethod
    def _group(parts: Parts, group: int, layers: int, channels_per_layer: int,
               device: torch.device) -> decoders.GroupStreams:
        """A layer group's parts as the decoders take them (which check that they fit each other); ValueError
        for alphabets out of range or distribution choices of another layout."""
        halves, shapes = parts[f"{group}.halves"].tolist(), parts[f"{group}.shapes"]
        if len(halves) != 2 or not all(1 <= half <= HALF for half in halves):
            raise ValueError("alphabet sizes out of range")
        channels = layers * channels_per_layer
        if shapes.numel() != 2 * channels:
            raise ValueError("distribution choices do not fit the layout")
        packed, codes, sparse, base = (parts[f"{group}.{name}"] for name in ("delta", "width", "anchor_width", "base"))
        if (packed.dtype != torch.uint8 or packed.numel() != -(-channels // 8) or codes.shape != (channels,)
                or codes.dtype != torch.uint8 or base.dtype != torch.int32 or base.shape != (1,)):
            raise ValueError("channel parameters do not fit the layout")
        delta = torch.from_numpy(np.unpackbits(packed.numpy(), count=channels, bitorder="little").astype(bool))
        if sparse.dtype != torch.uint8 or sparse.shape != (int(delta.sum()),):
            raise ValueError("anchors' bin widths do not fit the channels coded against anchors")
        anchor_codes = codes.clone()
        anchor_codes[delta] = sparse
        width, anchor_width = widths_of(codes, int(base)), widths_of(anchor_codes, int(base))
        return decoders.GroupStreams(
            layers, parts[f"{group}.words"], parts[f"{group}.offsets"], parts[f"{group}.states"],
            _slot_tables(halves[0], halves[1], torch.device(device)), shapes.reshape(2, -1),
            parts[f"{group}.centre"], anchor_width, width, delta)


@lru_cache(maxsize=64)
def _slot_tables(anchor_half: int, other_half: int, device: torch.device) -> torch.Tensor:
    """The decoders' slot tables for a group's two alphabets, [2, SHAPES, PROB_SCALE] int32 on `device` (kept:
    1 MiB a table, built once per alphabet pair and device)."""
    return torch.from_numpy(np.stack([entropy.slot_table(anchor_half), entropy.slot_table(other_half)])).to(device)
