"""The symbol distributions of the cachegen codec's entropy coding: one per channel, from a fixed family.

A channel's distribution is one of a fixed family of shapes (discretised Laplace and Gaussian curves of many
widths over the alphabet -half..half, and a uniform one), quantised to integer frequencies summing to
2^PROB_BITS (every symbol at least 1), so encoder and decoder on any machine build the same model and the
entry stores only one byte per channel: the shape chosen, the one whose cost on the channel's histogram is least.
Host-side numpy; the rANS coder (rans.py, and the decoders in kernels/rans.py) takes the tables from here.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ...kernels.rans import PROB_BITS, PROB_SCALE, SYMBOL_OFFSET

# Widths of the family's curves, in bins; Laplace curves are the common case of token deltas.
LAPLACE_SCALES = np.geomspace(0.05, 64.0, 40)
GAUSSIAN_SCALES = np.geomspace(0.3, 64.0, 24)
SHAPES = len(LAPLACE_SCALES) + len(GAUSSIAN_SCALES) + 1
COLUMNS = 2 * SYMBOL_OFFSET  # a table's columns: symbol + SYMBOL_OFFSET, for symbols -127..127


@lru_cache(maxsize=None)
def frequencies(half: int) -> np.ndarray:
    """The family over symbols -half..half (1 <= half <= 127): [SHAPES, COLUMNS] int64 frequencies, column
    symbol + SYMBOL_OFFSET (0 outside the alphabet), each row summing to 2^PROB_BITS with every symbol >= 1."""
    if not 1 <= half < SYMBOL_OFFSET:
        raise ValueError(f"alphabet half-width {half} is not in 1..{SYMBOL_OFFSET - 1}")
    symbols = np.abs(np.arange(-half, half + 1, dtype=np.float64))
    curves = [np.exp(-symbols / scale) for scale in LAPLACE_SCALES]
    curves += [np.exp(-0.5 * (symbols / scale) ** 2) for scale in GAUSSIAN_SCALES]
    curves.append(np.ones_like(symbols))  # uniform: the worst case is bounded
    width = symbols.shape[0]
    # One count each, the rest shared in proportion (largest remainders first): exact sums, no zero frequency.
    share = np.stack([curve / curve.sum() for curve in curves]) * (PROB_SCALE - width)
    counts = np.floor(share).astype(np.int64)
    remainder = share - counts
    missing = PROB_SCALE - width - counts.sum(axis=1)
    order = np.argsort(-remainder, axis=1, kind="stable")
    bump = np.arange(width)[None, :] < missing[:, None]
    np.put_along_axis(counts, order, np.take_along_axis(counts, order, axis=1) + bump, axis=1)
    table = np.zeros((SHAPES, COLUMNS), dtype=np.int64)
    table[:, SYMBOL_OFFSET - half:SYMBOL_OFFSET + half + 1] = counts + 1
    return table


@lru_cache(maxsize=None)
def cumulative(half: int) -> np.ndarray:
    """[SHAPES, COLUMNS] int64: each symbol's cumulative frequency (the frequencies of the symbols below it)."""
    table = frequencies(half)
    return np.cumsum(table, axis=1) - table


@lru_cache(maxsize=None)
def _bits(half: int) -> np.ndarray:
    """Each shape's cost of each symbol -half..half in bits, [2 * half + 1, SHAPES] (float32)."""
    table = frequencies(half)[:, SYMBOL_OFFSET - half:SYMBOL_OFFSET + half + 1]
    return np.ascontiguousarray((PROB_BITS - np.log2(table)).T.astype(np.float32))


def choose_shapes(symbols: np.ndarray, half: int) -> np.ndarray:
    """Each channel's shape, the one coding its symbols ([channels, n] integers in -half..half) in the fewest
    bits: [channels] uint8 (0 where n is 0)."""
    channels, count = symbols.shape
    if count == 0:
        return np.zeros(channels, dtype=np.uint8)
    width = 2 * half + 1
    offsets = (np.arange(channels) * width)[:, None]
    histogram = np.bincount((symbols + half + offsets).ravel(), minlength=channels * width).reshape(channels, width)
    return np.argmin(histogram.astype(np.float32) @ _bits(half), axis=1).astype(np.uint8)


@lru_cache(maxsize=None)
def slot_table(half: int) -> np.ndarray:
    """The decoders' table (kernels/rans.py): per shape and slot (a state's low PROB_BITS bits) the symbol it
    decodes to, packed as (symbol + SYMBOL_OFFSET) | frequency << 8 | (slot - cumulative) << 20: [SHAPES,
    PROB_SCALE] int32 (as int32 bits of a uint32)."""
    table, starts = frequencies(half), cumulative(half)
    packed = np.empty((SHAPES, PROB_SCALE), dtype=np.int64)
    slots = np.arange(PROB_SCALE)
    for shape in range(SHAPES):
        column = np.repeat(np.arange(COLUMNS), table[shape])  # the symbol column of each slot
        packed[shape] = column | table[shape, column] << 8 | (slots - starts[shape, column]) << 20
    return packed.astype(np.uint32).view(np.int32)
