"""Chunk-cache keys: what a chunk's KV is stored under.

A key holds the model's fingerprint, the digest of the chunk prefix's token ids and the digest of the chunk's
token ids, so KV made by another model, tokenizer or prefix can never be found. Plain Python (no torch import):
the gateway's router and admin views digest chunks without loading a model.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence


def token_digest(token_ids: Sequence[int]) -> str:
    """The SHA-256 of token ids (a list, tuple or 1-d tensor) packed as little-endian int64, first 32 hex
    digits: the same digest wherever the ids are held."""
    ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:32]


@dataclass(frozen=True)
class ChunkKey:
    model: str  # the model's fingerprint
    prefix: str  # digest of the chunk prefix's token ids
    tokens: str  # digest of the chunk's token ids

    @classmethod
    def of(cls, model_fingerprint: str, prefix_ids: list[int], chunk_ids: list[int]) -> "ChunkKey":
        return cls(model_fingerprint, token_digest(prefix_ids), token_digest(chunk_ids))

    @property
    def name(self) -> str:
        """The key as one string (file names of the disk tier, the key written into each file)."""
        return f"{self.model}-{self.prefix}-{self.tokens}"


def model_fingerprint(model) -> str:
    """Identifies a LlamaFamilyModel by its configuration and a sample of its weights, not by a name: 16 hex
    digits."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for tensor in (model.embed_tokens, model.lm_head, model.layers[0].qkv, model.layers[-1].qkv):
        digest.update(tensor.flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
