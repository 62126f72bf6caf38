"""CacheBlend (arXiv 2405.16444) on our Llama-family forward pass.

A RAG prompt is prefix + chunks + suffix (the question). Each chunk's KV is computed once, alone (after
a fixed chunk prefix), and kept with unrotated keys. To prefill a prompt:

1. every chunk's cached KV is placed at the chunk's positions in the prompt, keys rotated there (exactly
   what computing them at those positions gives);
2. layer 0 runs in full (its KV depends only on the tokens, so it equals the cache anyway);
3. at layer 1 every token's KV is computed fresh and compared with the cache; the chunk tokens whose
   values deviate most (the top `recompute_ratio` of them) are selected;
4. from layer 1 on, only the selected tokens and the suffix are computed; the other chunk tokens keep their
   cached KV. Attention of computed tokens sees every slot whose position is not after theirs.

recompute_ratio 1.0 computes every token at every layer (full prefill); 0.0 keeps every chunk's own KV,
as if each chunk had been computed in a block of its own (full reuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.llama import KVCache, LlamaFamilyModel, apply_rope

# The layer at which tokens are selected; the paper finds the deviation at an early layer predicts the
# later ones, and layer 0's KV never deviates (it depends on the token and its position only).
SELECTION_LAYER = 1


@dataclass
class ChunkKV:
    """One chunk's KV, computed with the chunk alone after `prefix_ids`; keys are not rotated."""

    token_ids: torch.Tensor  # [tokens]
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], before RoPE
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def precompute_chunk(model: LlamaFamilyModel, chunk_ids: list[int], prefix_ids: list[int] = ()) -> ChunkKV:
    """The chunk's KV as computed after `prefix_ids` (e.g. the system prompt), keys kept unrotated."""
    ids = torch.tensor([*prefix_ids, *chunk_ids], device=model.device)
    positions = torch.arange(ids.shape[0], device=model.device)
    start = len(prefix_ids)
    cache = model.new_cache(ids.shape[0])
    cache.positions[: ids.shape[0]] = positions
    cache.length = ids.shape[0]
    cos, sin = model.rope(positions)
    hidden = F.embedding(ids, model.embed_tokens)
    keys, values = [], []
    for layer in range(model.num_layers):
        q, k_raw, v = model.qkv_raw(layer, hidden)
        keys.append(k_raw[:, start:])
        values.append(v[:, start:])
        cache.keys[layer] = apply_rope(k_raw, cos, sin)
        cache.values[layer] = v
        hidden = model.finish_layer(layer, hidden, model.attend(layer, apply_rope(q, cos, sin), positions, cache))
    return ChunkKV(token_ids=ids[start:].clone(), keys=torch.stack(keys), values=torch.stack(values))


@dataclass
class BlendResult:
    logits: torch.Tensor  # [vocab] of the last prompt token
    cache: KVCache  # the prompt's KV, ready for decoding
    chunk_tokens: int
    recomputed_chunk_tokens: int

    @property
    def recompute_ratio(self) -> float:
        return self.recomputed_chunk_tokens / self.chunk_tokens if self.chunk_tokens else 0.0


def selected_count(chunk_tokens: int, ratio: float) -> int:
    return min(chunk_tokens, math.ceil(ratio * chunk_tokens - 1e-9))


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def blend_prefill(model: LlamaFamilyModel, segments: list, recompute_ratio: float) -> BlendResult:
    """Prefill a prompt given as segments in order: token id lists (computed) and ChunkKVs (cached chunks).
    The last segment must be computed tokens (the question), whose last position gives the logits."""
    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError("recompute_ratio must be between 0 and 1")
    if not segments or isinstance(segments[-1], ChunkKV) or not segments[-1]:
        raise ValueError("blending needs computed tokens (the question) after the last chunk")
    device = model.device
    pieces = [s.token_ids.tolist() if isinstance(s, ChunkKV) else list(s) for s in segments]
    ids = torch.tensor([t for piece in pieces for t in piece], device=device)
    total = ids.shape[0]
    positions = torch.arange(total, device=device)
    cos, sin = model.rope(positions)
    cache = model.new_cache(total + 64)
    cache.positions[:total] = positions
    cache.length = total

    # 1. Cached chunk KV at the chunk's positions in this prompt.
    is_chunk = torch.zeros(total, dtype=torch.bool, device=device)
    start = 0
    for segment, piece in zip(segments, pieces):
        span = slice(start, start + len(piece))
        if isinstance(segment, ChunkKV):
            cache.keys[:, :, span] = apply_rope(segment.keys.to(device, model.dtype), cos[span], sin[span])
            cache.values[:, :, span] = segment.values.to(device, model.dtype)
            is_chunk[span] = True
        start = span.stop
    chunk_tokens = int(is_chunk.sum())

    # 2-4. Layer by layer over the active tokens (all of them until the selection layer).
    active = positions
    hidden = F.embedding(ids, model.embed_tokens)
    for layer in range(model.num_layers):
        q, k, v = model.qkv_raw(layer, hidden)
        q, k = apply_rope(q, cos[active], sin[active]), apply_rope(k, cos[active], sin[active])
        if layer == SELECTION_LAYER and chunk_tokens:
            keep = _select(cache.values[layer][:, active], v, is_chunk[active], recompute_ratio)
            active, hidden, q, k, v = active[keep], hidden[keep], q[:, keep], k[:, keep], v[:, keep]
        cache.keys[layer][:, active] = k
        cache.values[layer][:, active] = v
        hidden = model.finish_layer(layer, hidden, model.attend(layer, q, active, cache))
    recomputed = int(is_chunk[active].sum()) if model.num_layers > SELECTION_LAYER else chunk_tokens
    return BlendResult(model.logits(hidden[-1:])[0], cache, chunk_tokens, recomputed)


def _select(cached_values: torch.Tensor, fresh_values: torch.Tensor, chunk_rows: torch.Tensor,
            ratio: float) -> torch.Tensor:
    """Rows to keep computing: every non-chunk row, and the chunk rows whose values deviate most."""
    deviation = (fresh_values.float() - cached_values.float()).pow(2).sum(dim=(0, 2))  # [rows]
    deviation[~chunk_rows] = -1.0
    count = selected_count(int(chunk_rows.sum()), ratio)
    keep = ~chunk_rows
    if count:
        keep[torch.topk(deviation, count).indices] = True
    return keep
