"""`ChunkKV`: one chunk's KV cache as the chunk-cache store keeps it.

The hand-off between the chunk-cache store (chunkcache/kv_store.py, tiers.py, codec/), which keeps and moves
these, and blending (chunkcache/blend.py), which computes them (precompute_chunk) and places them in a prompt.
Tensors only: this module imports no model, so storage and its tests run without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExactHead:
    """The KV of a prompt's first tokens computed exactly, with keys already rotated to their positions 0..n-1,
    as an engine's KV pool holds them (SGLang's radix-cache match: sglang_plugin/prefill.py). A blend reuses it
    as is (chunkcache/blend.py: blend_prefill's `prefix_kv`), where a ChunkKV's keys are rotated on placing."""

    token_ids: torch.Tensor  # [tokens], on the host
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], rotated to positions 0..tokens-1
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape or self.keys.ndim != 4 or \
                self.keys.shape[2] != self.token_ids.shape[0]:
            raise ValueError("an exact head needs keys and values [layers, kv_heads, tokens, head_dim] for its "
                             "token ids")

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


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
