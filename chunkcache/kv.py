"""`ChunkKV`: one chunk's KV cache as the chunk-cache store keeps it.

The hand-off between the chunk-cache store (chunkcache/kv_store.py, tiers.py, codec/), which keeps and moves
these, and blending (chunkcache/blend.py), which computes them (precompute_chunk) and places them in a prompt.
Tensors only: this module imports no model, so storage and its tests run without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkKV:
    """One chunk's KV, computed with the chunk alone after `prefix_ids`; keys are not rotated."""

    token_ids: torch.Tensor  # [tokens], on the host
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], before RoPE
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes
