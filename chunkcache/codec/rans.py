"""The cachegen codec's rANS encoder: a layer group's symbols as interleaved rANS streams in the layout that
kernels/rans.py describes and decodes (lanes of channels, blocks of LANE_BLOCK lanes sharing one word stream).

Host-side numpy, vectorised across lanes: rANS encodes the symbols backwards, so the encoder walks the steps
(pass, token) from the last, every lane at once, recording per step which lanes flushed a word; the blocks'
streams are those words in the order the decoders read them (step after step, lanes in order within a step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...kernels.rans import LANE_BLOCK, PROB_BITS, STATE_LOW, SYMBOL_OFFSET, WORD_BITS, blocks_of, lane_shape


@dataclass(frozen=True)
class EncodedStreams:
    """One layer group's coded symbols: connects the encoder here and the cachegen codec, which stores them as
    the parts `words`, `offsets` and `states` (kernels/rans.py: GroupStreams, for their meaning)."""

    words: np.ndarray  # uint16 [n]
    offsets: np.ndarray  # int32 [blocks + 1]
    states: np.ndarray  # uint32 [lanes]


def encode(symbols: np.ndarray, shapes: np.ndarray, frequencies: tuple[np.ndarray, np.ndarray],
           cumulative: tuple[np.ndarray, np.ndarray], group_tokens: int) -> EncodedStreams:
    """symbols [channels, tokens] integers in token order, each within its table's alphabet; shapes [2, channels]
    (each channel's shape for its anchors, every group_tokens-th token, and for its other tokens); frequencies
    and cumulative: the anchors' and the others' [shapes, 2 * SYMBOL_OFFSET] tables (entropy.py). Lossless:
    kernels/rans.py's decoders give `symbols` back."""
    channels, tokens = symbols.shape
    passes, lanes = lane_shape(channels, tokens)
    blocks = blocks_of(lanes)
    padded = blocks * LANE_BLOCK
    # By pass, token and lane (the order the decoders go in): each channel's symbols and table rows.
    grid = np.zeros((passes * lanes, tokens), dtype=np.int16)
    grid[:channels] = symbols
    column = np.ascontiguousarray(grid.reshape(passes, lanes, tokens).transpose(0, 2, 1)).astype(np.int32)
    column += SYMBOL_OFFSET
    row_grid = np.zeros((2, passes * lanes), dtype=np.int32)
    row_grid[:, :channels] = shapes
    which = (np.arange(tokens) % group_tokens != 0).astype(np.int32)  # 0: an anchor's table set, 1: others'
    rows = row_grid.reshape(2, passes, lanes)[which].transpose(1, 0, 2)  # [passes, tokens, lanes]
    shape_count, columns = frequencies[0].shape
    at = (which[None, :, None] * shape_count + rows) * columns + column  # into the flattened [2, shapes, columns]
    freq, start = (np.stack(tables).astype(np.uint32).ravel().take(at) for tables in (frequencies, cumulative))
    if any((freq[p, :, :min(lanes, channels - p * lanes)] == 0).any() for p in range(passes)):
        raise ValueError("a symbol outside its table's alphabet")
    words = np.zeros((passes, tokens, padded), dtype=np.uint16)
    flushed = np.zeros((passes, tokens, padded), dtype=bool)
    state = np.full(lanes, STATE_LOW, dtype=np.uint32)  # uint32 arithmetic: every state is below 2^32
    for p in range(passes - 1, -1, -1):
        active = min(lanes, channels - p * lanes)  # the lanes coding a channel in this pass: a prefix
        live = state[:active]
        for t in range(tokens - 1, -1, -1):
            f = freq[p, t, :active]
            # Flush a word where coding the symbol would take the state past 2^32 (f << (32 - PROB_BITS)).
            flush = live >= f << (32 - PROB_BITS)
            words[p, t, :active] = live  # the low 16 bits
            flushed[p, t, :active] = flush
            live = live >> (flush.astype(np.uint32) * WORD_BITS)
            quotient = live // f
            live = (quotient << PROB_BITS) + (live - quotient * f) + start[p, t, :active]
        state[:active] = live
    steps = passes * tokens
    words, flushed = words.reshape(steps, padded), flushed.reshape(steps, padded)
    by_block = flushed.reshape(steps, blocks, LANE_BLOCK).transpose(1, 0, 2)
    stream = words.reshape(steps, blocks, LANE_BLOCK).transpose(1, 0, 2)[by_block]
    offsets = np.concatenate([[0], np.cumsum(by_block.sum(axis=(1, 2)))]).astype(np.int32)
    return EncodedStreams(stream, offsets, state)
