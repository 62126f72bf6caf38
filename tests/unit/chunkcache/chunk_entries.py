"""Small chunk-cache entries for the store and tier tests: random KV of a few tokens and its key."""

from __future__ import annotations

import torch
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV


def kv(seed: int, tokens: int = 8) -> ChunkKV:
    """Entry `seed`: 2 layers, 2 KV heads, head size 4, token ids below 100."""
    generator = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randint(0, 100, (tokens,), generator=generator),
                   torch.randn(2, 2, tokens, 4, generator=generator), torch.randn(2, 2, tokens, 4, generator=generator))


def key(n: int, model: str = "m") -> ChunkKey:
    """The key of kv(n): its token digest is that of kv(n)'s token ids, as in real use."""
    return ChunkKey.of(model, [1, 2], kv(n).token_ids.tolist())
