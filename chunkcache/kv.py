"""`ChunkKV`: one chunk's KV cache as the chunk-cache store keeps it.

The hand-off between the chunk-cache store (chunkcache/kv_store.py, tiers.py, codec/), which keeps and moves
these, and blending (chunkcache/blend.py), which computes them (precompute_chunk) and places them in a prompt.
Tensors only: this module imports no model, so storage and its tests run without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChannelWeights:
    """How much a quantisation error in each channel of a chunk's keys moves the model's output (relative: only
    ratios within a layer count), from blending, which measures them when it computes the chunk's KV
    (chunkcache/channel_weights.py), to the KV codecs' encoders (codec/cachegen.py spends its bins by them).
    Values have none (channel_weights.py says why)."""

    keys: torch.Tensor  # float32 [layers, kv_heads, head_dim], >= 0, on the KV's device


@dataclass
class ChunkKV:
    """One chunk's KV, computed with the chunk alone after `prefix_ids`; keys are not rotated."""

    token_ids: torch.Tensor  # [tokens], on the host
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], before RoPE
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    # The encoders' channel weights, measured when the KV was computed; None where not measured (an entry read
    # back from bytes: its bins are chosen already).
    weights: ChannelWeights | None = None

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        weights = self.weights.keys.nbytes if self.weights is not None else 0
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes + weights
