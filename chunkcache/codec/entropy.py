"""Entropy coding of quantised KV symbols with one symbol distribution per channel, on constriction's range
coder (Rust; categorical models).

A channel's distribution is one of a fixed family of shapes (discretised Laplace and Gaussian curves of many
widths over the alphabet -half..half, as integer frequencies, so encoder and decoder on any machine build the
same model): the encoder picks, per channel, the shape whose cross-entropy with the channel's histogram is
least, and the entry stores that choice as one byte per channel. Channels of one shape are coded together with
one model, so a tensor costs a few dozen coder calls, not one per channel. Host-side numpy only.
"""

from __future__ import annotations

from functools import lru_cache

import constriction
import numpy as np

# Widths of the family's curves, in bins; Laplace curves are the common case of token deltas.
LAPLACE_SCALES = np.geomspace(0.05, 64.0, 40)
GAUSSIAN_SCALES = np.geomspace(0.3, 64.0, 24)
FREQUENCY_TOTAL = 1 << 20


@lru_cache(maxsize=None)
def shape_table(half: int) -> np.ndarray:
    """The family over symbols -half..half: [shapes, 2 * half + 1] integer frequencies (float32, each >= 1)."""
    symbols = np.abs(np.arange(-half, half + 1, dtype=np.float64))
    curves = [np.exp(-symbols / scale) for scale in LAPLACE_SCALES]
    curves += [np.exp(-0.5 * (symbols / scale) ** 2) for scale in GAUSSIAN_SCALES]
    curves.append(np.ones_like(symbols))  # uniform: the worst case is bounded
    table = np.stack([curve / curve.sum() for curve in curves])
    return np.maximum(np.round(table * FREQUENCY_TOTAL), 1.0).astype(np.float32)


@lru_cache(maxsize=None)
def _bits(half: int) -> np.ndarray:
    """Each shape's cost of each symbol in bits, [2 * half + 1, shapes] (float32)."""
    table = shape_table(half)
    return np.ascontiguousarray(-np.log2(table / table.sum(axis=1, keepdims=True)).T)


@lru_cache(maxsize=None)
def _model(half: int, shape: int) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(shape_table(half)[shape], perfect=False)


def encode_channels(encoder: constriction.stream.queue.RangeEncoder, symbols: np.ndarray, half: int) -> np.ndarray:
    """Appends `symbols` ([channels, n] integers in -half..half) to `encoder`, each channel with the shape that
    codes it in the fewest bits; returns the shapes chosen, [channels] uint8 (decode_channels needs them)."""
    channels, count = symbols.shape
    codes = (symbols + half).astype(np.int32)
    if count == 0:
        return np.zeros(channels, dtype=np.uint8)
    width = 2 * half + 1
    offsets = (np.arange(channels) * width)[:, None]
    histogram = np.bincount((codes + offsets).ravel(), minlength=channels * width).reshape(channels, width)
    shapes = np.argmin(histogram.astype(np.float32) @ _bits(half), axis=1).astype(np.uint8)
    for shape in np.unique(shapes):
        encoder.encode(codes[shapes == shape].ravel(), _model(half, int(shape)))
    return shapes


def decode_channels(decoder: constriction.stream.queue.RangeDecoder, shapes: np.ndarray, count: int,
                    half: int) -> np.ndarray:
    """The inverse of encode_channels: [channels, count] int16 symbols in -half..half, given the shapes stored."""
    symbols = np.empty((shapes.shape[0], count), dtype=np.int16)
    if count == 0:
        return symbols
    if shapes.max(initial=0) >= shape_table(half).shape[0]:
        raise ValueError("unknown distribution shape")
    for shape in np.unique(shapes):
        rows = shapes == shape
        symbols[rows] = decoder.decode(_model(half, int(shape)), int(rows.sum()) * count).reshape(-1, count)
    return symbols - half
