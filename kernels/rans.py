"""The cachegen codec's decoder (chunkcache/codec/cachegen.py): interleaved rANS entropy decoding fused with the
codec's dequantisation, straight into KV [layers, kv_heads, tokens, head_dim] of the entry's dtype.

The stream format (what chunkcache/codec/rans.py encodes), per layer group of one KV tensor:
- Channels (layer, KV head, head_dim index, in that order) are coded by lanes, each an rANS coder (Duda,
  arXiv 1311.2540) with a 32-bit state, 16-bit words and symbol frequencies quantised to 2^PROB_BITS. A chunk
  of `tokens` tokens gets `passes` channels per lane (`lane_shape`: short chunks share a lane between channels,
  so that the 4-byte state each lane stores stays a small part of the entry): lane l codes channel
  p * lanes + l in pass p, its tokens in order (anchors at every group_tokens-th token, the others between).
- Lanes go in blocks of LANE_BLOCK that renormalise in lockstep and share one word stream (interleaved rANS,
  as DietGPU and nvCOMP's ANS lay theirs out for warps): after each decoded symbol, the lanes whose state fell
  under STATE_LOW read the block's next words, in lane order. `offsets` [blocks + 1] are the blocks' first
  words. Each lane's stored state is its decoder's first; the encoder starts every lane at STATE_LOW, so a
  decoder that does not end there, or whose block does not end at its last word, met a damaged stream.
- A symbol's distribution is one of a family of shapes (the codec's), chosen per channel for its anchors and
  for its other tokens. `tables` [2, shapes, 2^PROB_BITS] int32 map a state's slot to (symbol + 128) | freq
  << 8 | (slot - cumulative freq) << 20, the anchors' family first: one load a symbol.

CacheGen (Liu et al., arXiv 2310.07240, Section 6) decodes on the GPU with one thread per token group of a
channel; here one thread (lane) decodes whole channels, so the anchor it reconstructs stays in a register.

`decode` runs the Triton kernel on CUDA (one program a block of lanes, one launch for all the layer groups it
is given: the codec gives an entry's keys' and values', stacked) and `decode_reference` otherwise: numpy rANS
decoding vectorised across lanes (`decode_symbols`), then dequantisation in torch (`dequantise_reference`) on
the device asked for. Both raise ValueError for a damaged or mismatched stream.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

PROB_BITS = 12  # symbol frequencies sum to 2^PROB_BITS
PROB_SCALE = 1 << PROB_BITS
WORD_BITS = 16  # renormalisation reads 16-bit words
STATE_LOW = 1 << 16  # a decoder's state is in [STATE_LOW, 2^32) between symbols
LANE_BLOCK = 32  # lanes sharing one word stream (one warp)
LANE_SYMBOLS = 512  # short chunks put channels together until a lane codes at least this many symbols
SYMBOL_OFFSET = 128  # a table entry's low byte is its symbol + SYMBOL_OFFSET


def lane_shape(channels: int, tokens: int) -> tuple[int, int]:
    """(passes, lanes) of a layer group: channels per lane and lanes, for `channels` channels of `tokens`."""
    lanes = -(-channels // max(1, min(channels, -(-LANE_SYMBOLS // max(tokens, 1)))))
    return (-(-channels // lanes) if lanes else 1), lanes


def blocks_of(lanes: int) -> int:
    return -(-lanes // LANE_BLOCK)


@dataclass(frozen=True)
class GroupStreams:
    """One layer group of one KV tensor in a cachegen entry, as the decoders take it: connects the cachegen
    codec (which reads it from the entry's parts) and the decoders here. `channels` = layers * kv_heads *
    head_dim of the group; all tensors on one device (the host for decode_reference)."""

    layers: int  # consecutive layers, after the previous groups'
    words: torch.Tensor  # int16 [n]: 16-bit words (as int16 bits), block after block
    offsets: torch.Tensor  # int32 [blocks + 1]: each block's first word, then the end
    states: torch.Tensor  # int32 [lanes]: each lane's first decoder state (as int32 bits of a uint32)
    tables: torch.Tensor  # int32 [2, shapes, PROB_SCALE]: packed slot tables (anchors', then the others')
    shapes: torch.Tensor  # uint8 [2, channels]: each channel's shape for its anchors and for its others
    centre: torch.Tensor  # bf16 [channels]: each channel's centre (its anchors' mean)
    anchor_width: torch.Tensor  # bf16 [channels]: bin width of anchors
    delta_width: torch.Tensor  # bf16 [channels]: bin width of the other tokens
    delta: torch.Tensor  # bool [channels]: others are coded against their anchor (else the centre)

    def to(self, device: torch.device) -> "GroupStreams":
        return GroupStreams(self.layers, *(getattr(self, field.name).to(device) for field in fields(self)[1:]))

    @property
    def channels(self) -> int:
        return self.shapes.shape[1]

    def check(self, tokens: int, heads: int, head_dim: int) -> None:
        """ValueError unless the parts' shapes fit a group of `self.layers` layers (a mismatched entry)."""
        channels = self.layers * heads * head_dim
        _, lanes = lane_shape(channels, tokens)
        expected = {"shapes": (2, channels), "centre": (channels,), "anchor_width": (channels,),
                    "delta_width": (channels,), "delta": (channels,), "states": (lanes,),
                    "offsets": (blocks_of(lanes) + 1,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"cachegen stream part {name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"not {shape}")
        if self.tables.dim() != 3 or self.tables.shape[0] != 2 or self.tables.shape[2] != PROB_SCALE:
            raise ValueError("cachegen slot tables must be [2, shapes, PROB_SCALE]")
        dtypes = {"words": torch.int16, "offsets": torch.int32, "states": torch.int32, "tables": torch.int32,
                  "shapes": torch.uint8, "centre": torch.bfloat16, "anchor_width": torch.bfloat16,
                  "delta_width": torch.bfloat16, "delta": torch.bool}
        if self.words.dim() != 1:
            raise ValueError("cachegen stream words must be one-dimensional")
        for name, dtype in dtypes.items():
            if getattr(self, name).dtype != dtype:
                raise ValueError(f"cachegen stream part {name} is {getattr(self, name).dtype}, not {dtype}")


def _checked_offsets(group: GroupStreams) -> np.ndarray:
    offsets = group.offsets.cpu().numpy().astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != group.words.shape[0] or (np.diff(offsets) < 0).any():
        raise ValueError("damaged cachegen stream: block offsets do not fit its words")
    return offsets


def _checked_shapes(group: GroupStreams) -> np.ndarray:
    shapes = group.shapes.cpu().numpy().astype(np.int64)
    if shapes.size and shapes.max() >= group.tables.shape[1]:
        raise ValueError("damaged cachegen stream: unknown distribution shape")
    return shapes


def decode_symbols(group: GroupStreams, tokens: int, group_tokens: int) -> np.ndarray:
    """The reference rANS decoder (numpy, vectorised across lanes): the group's symbols, [channels, tokens]
    int16 in token order. ValueError when the stream is damaged (a block reads past its words or leaves some
    unread, or a lane does not end at STATE_LOW) or its parts do not fit each other."""
    channels = group.channels
    passes, lanes = lane_shape(channels, tokens)
    offsets = _checked_offsets(group)
    shapes = _checked_shapes(group)
    words = group.words.cpu().numpy().view(np.uint16).astype(np.int64)
    table = group.tables.cpu().numpy().view(np.uint32).astype(np.int64).reshape(-1)
    shape_count = group.tables.shape[1]
    state = group.states.cpu().numpy().view(np.uint32).astype(np.int64)
    columns = np.zeros((passes, tokens, lanes), dtype=np.uint8)  # symbols + SYMBOL_OFFSET, by pass, token, lane
    ptr, end = offsets[:-1].copy(), offsets[1:]
    for p in range(passes):
        # The lanes coding a channel in this pass: all of them, or (the last pass) the first few.
        active = min(lanes, channels - p * lanes)
        channel = slice(p * lanes, p * lanes + active)
        bases = [(which * shape_count + shapes[which, channel]) * PROB_SCALE for which in (0, 1)]
        block = np.arange(active) // LANE_BLOCK
        last = np.minimum(np.arange(0, active, LANE_BLOCK) + LANE_BLOCK, active) - 1  # each block's last lane
        live = state[:active]
        for t in range(tokens):
            entry = table[bases[0 if t % group_tokens == 0 else 1] + (live & (PROB_SCALE - 1))]
            columns[p, t, :active] = entry
            live = ((entry >> 8) & 0xFFF) * (live >> PROB_BITS) + (entry >> 20)
            need = live < STATE_LOW
            if not need.any():
                continue
            counted = np.cumsum(need)
            before = np.concatenate([[0], counted[last[:-1]]])  # words the blocks before each have taken
            taken = counted[last] - before
            if (ptr[:taken.shape[0]] + taken > end[:taken.shape[0]]).any():
                raise ValueError("damaged cachegen stream: a block reads past its words")
            reading = np.flatnonzero(need)
            position = ptr[block[reading]] + counted[reading] - 1 - before[block[reading]]
            live[reading] = (live[reading] << WORD_BITS) | words[position]
            ptr[:taken.shape[0]] += taken
        state[:active] = live
    if (ptr != end).any() or (state != STATE_LOW).any():
        raise ValueError("damaged cachegen stream: the decoders do not end where the encoder began")
    symbols = columns.transpose(0, 2, 1).reshape(passes * lanes, tokens)[:channels].astype(np.int16)
    return symbols - SYMBOL_OFFSET


def dequantise_reference(symbols: torch.Tensor, group: GroupStreams, group_tokens: int) -> torch.Tensor:
    """The group's values from its symbols ([channels, tokens] integers in token order, on the parameters'
    device), float32 [channels, tokens]: an anchor (every group_tokens-th token) is centre + symbol * anchor
    width; another token is its reference (its anchor's value where `delta`, else the centre) + symbol * delta
    width. float32 arithmetic, each product rounded before the sum."""
    tokens = symbols.shape[1]
    centre = group.centre.float()[:, None]
    is_anchor = torch.arange(tokens, device=symbols.device) % group_tokens == 0
    anchor = (centre + symbols[:, is_anchor].float() * group.anchor_width.float()[:, None])
    anchor = anchor.repeat_interleave(group_tokens, dim=1)[:, :tokens]
    reference = torch.where(group.delta[:, None], anchor, centre)
    others = reference + symbols.float() * group.delta_width.float()[:, None]
    return torch.where(is_anchor, anchor, others)


def decode_reference(groups: list[GroupStreams], heads: int, tokens: int, head_dim: int, group_tokens: int,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The KV tensor the groups code, [layers, heads, tokens, head_dim] of `dtype` on `device`: numpy rANS
    decoding on the host (decode_symbols), dequantisation in torch on `device`. ValueError for damaged or
    mismatched streams."""
    slabs = []
    for group in groups:
        group.check(tokens, heads, head_dim)
        symbols = torch.from_numpy(decode_symbols(group, tokens, group_tokens)).to(device)
        values = dequantise_reference(symbols, group.to(device), group_tokens)
        slabs.append(values.reshape(group.layers, heads, head_dim, tokens).permute(0, 1, 3, 2).to(dtype))
    return torch.cat(slabs).contiguous()


if triton is not None:

    @triton.jit
    def _decode_kernel(words, offsets, states, tables, anchor_shapes, other_shapes, centre, anchor_width,
                       delta_width, delta, meta, block_group, out, status, tokens, head_dim, word_count,
                       SHAPES: tl.constexpr, GROUP_TOKENS: tl.constexpr, LANES: tl.constexpr,
                       PROB_BITS: tl.constexpr, STATE_LOW: tl.constexpr):
        block = tl.program_id(0)
        group = tl.load(block_group + block)
        # meta [groups, 6] int64: lanes, channels, passes, first lane, first channel, first output element.
        lanes = tl.load(meta + group * 6)
        channels = tl.load(meta + group * 6 + 1)
        passes = tl.load(meta + group * 6 + 2)
        first_lane = tl.load(meta + group * 6 + 3)
        first_channel = tl.load(meta + group * 6 + 4)
        out_base = tl.load(meta + group * 6 + 5)
        first_block = first_lane // LANES  # each group's lanes start at a block boundary
        lane = (block - first_block) * LANES + tl.arange(0, LANES)
        lane_ok = lane < lanes
        state = tl.load(states + first_lane + lane, mask=lane_ok, other=STATE_LOW).to(tl.int64) & 0xFFFFFFFF
        ptr = tl.load(offsets + block)
        end = tl.load(offsets + block + 1)
        anchor_table = tables + (2 * group).to(tl.int64) * SHAPES * (1 << PROB_BITS)
        other_table = anchor_table + SHAPES * (1 << PROB_BITS)
        damaged = (ptr > end) | (end > word_count)
        unknown = tl.full([], 0, tl.int32)  # whether a lane met a shape the tables do not have
        for p in range(passes):
            channel = p * lanes + lane
            active = lane_ok & (channel < channels)
            at = first_channel + channel
            c = tl.load(centre + at, mask=active, other=0.0).to(tl.float32)
            aw = tl.load(anchor_width + at, mask=active, other=0.0).to(tl.float32)
            dw = tl.load(delta_width + at, mask=active, other=0.0).to(tl.float32)
            is_delta = tl.load(delta + at, mask=active, other=0) != 0
            anchor_shape = tl.load(anchor_shapes + at, mask=active, other=0).to(tl.int64)
            other_shape = tl.load(other_shapes + at, mask=active, other=0).to(tl.int64)
            unknown |= tl.max(((anchor_shape >= SHAPES) | (other_shape >= SHAPES)).to(tl.int32), 0)
            anchor_rows = anchor_table + tl.minimum(anchor_shape, SHAPES - 1) * (1 << PROB_BITS)
            other_rows = other_table + tl.minimum(other_shape, SHAPES - 1) * (1 << PROB_BITS)
            dst = out + out_base + (channel // head_dim) * tokens * head_dim + channel % head_dim
            anchor = c
            for t in range(tokens):
                is_anchor = t % GROUP_TOKENS == 0
                rows = tl.where(is_anchor, anchor_rows, other_rows)
                entry = tl.load(rows + (state & ((1 << PROB_BITS) - 1)), mask=active, other=0).to(tl.int64)
                symbol = ((entry & 0xFF) - 128).to(tl.float32)
                state = tl.where(active, ((entry >> 8) & 0xFFF) * (state >> PROB_BITS) + ((entry >> 20) & 0xFFF),
                                 state)
                need = active & (state < STATE_LOW)
                taken = need.to(tl.int32)
                position = ptr + tl.cumsum(taken, 0) - taken
                readable = need & (position < end)
                word = tl.load(words + position, mask=readable, other=0).to(tl.int64) & 0xFFFF
                state = tl.where(need, (state << 16) | word, state)
                ptr += tl.sum(taken, 0)
                anchor = tl.where(is_anchor, c + symbol * aw, anchor)
                value = tl.where(is_anchor, anchor, tl.where(is_delta, anchor, c) + symbol * dw)
                tl.store(dst + t * head_dim, value.to(out.dtype.element_ty), mask=active)
        ended = (state == STATE_LOW) | ~lane_ok
        damaged = damaged | (ptr != end) | (tl.min(ended.to(tl.int32), 0) == 0) | (unknown != 0)
        tl.store(status + block, damaged.to(tl.int32))


def decode(groups: list[GroupStreams], heads: int, tokens: int, head_dim: int, group_tokens: int,
           dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """As decode_reference: on CUDA (with Triton) by decode_triton, elsewhere by decode_reference."""
    device = torch.device(device)
    if triton is None or device.type != "cuda":
        return decode_reference(groups, heads, tokens, head_dim, group_tokens, dtype, device)
    return decode_triton(groups, heads, tokens, head_dim, group_tokens, dtype, device)


def _concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, through numpy for host tensors: torch.cat of tensors safetensors loaded from a bytes buffer
    ran at about 1 GB/s on the host (10 ms for an 8B model's 12 MB entry), numpy's concatenation at 25 GB/s."""
    if all(part.device.type == "cpu" for part in parts) and parts[0].dtype != torch.bfloat16:
        return torch.from_numpy(np.concatenate([part.numpy() for part in parts]))
    return torch.cat(parts)


def decode_triton(groups: list[GroupStreams], heads: int, tokens: int, head_dim: int, group_tokens: int,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """As decode_reference (the same values: no fused multiply-add), in one Triton launch for all groups (one
    program a block of lanes); parts on the host are copied up through pinned memory, parts on the device are
    used there. The kernel checks the streams itself (reads stay within the words, shapes within the tables), so
    nothing is read back before the launch; a damaged stream is a ValueError after it (one synchronisation). On
    a CPU device it runs under the Triton interpreter (TRITON_INTERPRET=1) only: the tests' check."""
    layers = sum(group.layers for group in groups)
    out = torch.empty((layers, heads, tokens, head_dim), dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    meta, block_group, words, offsets, states, lane = [], [], [], [], [], 0
    channel, word, element = 0, 0, 0
    for index, group in enumerate(groups):
        group.check(tokens, heads, head_dim)
        passes, lanes = lane_shape(group.channels, tokens)
        blocks = blocks_of(lanes)
        meta.append((lanes, group.channels, passes, lane, channel, element))
        block_group += [index] * blocks
        padding = torch.full((blocks * LANE_BLOCK - lanes,), STATE_LOW, dtype=torch.int32, device=group.states.device)
        states.append(torch.cat([group.states, padding]))
        words.append(group.words)
        # A block's words end where the next one's begin: a group's last block ends at the next group's first word.
        offsets.append(group.offsets[:-1].long() + word)
        lane, channel, word = lane + blocks * LANE_BLOCK, channel + group.channels, word + group.words.shape[0]
        element += group.layers * heads * tokens * head_dim
    offsets.append(torch.tensor([word], device=offsets[-1].device))
    host = {"words": _concatenated(words), "offsets": torch.cat(offsets), "states": torch.cat(states),
            "meta": torch.tensor(meta, dtype=torch.int64), "block_group": torch.tensor(block_group, dtype=torch.int32)}
    for name in ("centre", "anchor_width", "delta_width", "delta"):
        host[name] = torch.cat([getattr(group, name).reshape(-1) for group in groups])
    host["delta"] = host["delta"].to(torch.uint8)
    host["anchor_shapes"] = torch.cat([group.shapes[0] for group in groups])
    host["other_shapes"] = torch.cat([group.shapes[1] for group in groups])
    pin = device.type == "cuda"
    up = {name: (tensor.pin_memory() if pin and not tensor.is_cuda else tensor).to(device, non_blocking=True)
          for name, tensor in host.items()}
    tables = torch.cat([group.tables.to(device, non_blocking=True) for group in groups])
    status = torch.empty(len(block_group), dtype=torch.int32, device=device)
    _decode_kernel[(len(block_group),)](
        up["words"], up["offsets"], up["states"], tables, up["anchor_shapes"], up["other_shapes"], up["centre"],
        up["anchor_width"], up["delta_width"], up["delta"], up["meta"], up["block_group"], out, status, tokens,
        head_dim, word, SHAPES=groups[0].tables.shape[1], GROUP_TOKENS=group_tokens, LANES=LANE_BLOCK,
        PROB_BITS=PROB_BITS, STATE_LOW=STATE_LOW, num_warps=1,
        enable_fp_fusion=False)  # the reference's roundings: a product, then a sum
    if bool(status.any()):
        raise ValueError("damaged cachegen stream: the decoders do not end where the encoder began")
    return out
