"""Scores that decide which chunk tokens blending recomputes (the rules are in chunkcache/selection.py).

- `deviation`: CacheBlend (arXiv 2405.16444) scores each token by how far its freshly computed KV at an
  early layer is from the cached one (squared L2 over heads and dimensions). One fused reduction on CUDA
  (Triton: one read of each input, no float32 copies).
- `attention_mass`: query-aware selection (ProphetKV arXiv 2602.02579, A3 arXiv 2511.17560) scores each
  token by the attention probability the question's tokens give it, summed over heads and query rows. Two
  batched matrix products and a softmax (cuBLAS on CUDA); the scores of a few dozen question rows over a few
  thousand slots are small, so no fused kernel pays here.
Top-k is torch's.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def deviation_reference(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """fresh, cached [kv_heads, tokens, head_dim] -> [tokens] float32 squared L2 distance."""
    return (fresh.float() - cached.float()).pow(2).sum(dim=(0, 2))


if triton is not None:

    @triton.jit
    def _deviation_kernel(fresh, cached, out, tokens, fresh_head, fresh_token, cached_head, cached_token,
                          KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
        t = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        d = tl.arange(0, HEAD_DIM)
        rows = t[:, None] < tokens
        total = tl.zeros((BLOCK_TOKENS,), dtype=tl.float32)
        for head in tl.static_range(KV_HEADS):
            a = tl.load(fresh + head * fresh_head + t[:, None].to(tl.int64) * fresh_token + d[None, :], mask=rows)
            b = tl.load(cached + head * cached_head + t[:, None].to(tl.int64) * cached_token + d[None, :],
                        mask=rows)
            diff = a.to(tl.float32) - b.to(tl.float32)
            total += tl.sum(diff * diff, axis=1)
        tl.store(out + t, total, mask=t < tokens)


def deviation(fresh: torch.Tensor, cached: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """As `deviation_reference`, fused on CUDA (into `out` when given)."""
    kv_heads, tokens, head_dim = fresh.shape
    if (triton is None or not fresh.is_cuda or head_dim & (head_dim - 1) or fresh.stride(-1) != 1
            or cached.stride(-1) != 1):
        return deviation_reference(fresh, cached)
    out = torch.empty(tokens, dtype=torch.float32, device=fresh.device) if out is None else out
    block = 16
    _deviation_kernel[(triton.cdiv(tokens, block),)](fresh, cached, out, tokens, fresh.stride(0), fresh.stride(1),
                                                      cached.stride(0), cached.stride(1), KV_HEADS=kv_heads,
                                                      HEAD_DIM=head_dim, BLOCK_TOKENS=block)
    return out


def causal_bias(query_positions: torch.Tensor, kv_length: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """[group * queries, kv_length]: 0 where a query (repeated for each of a KV head's `group` query heads)
    sees the slot, -inf where the slot's position is after the query's. Built once per probe, for all layers."""
    future = torch.arange(kv_length, device=query_positions.device)[None, :] > query_positions[:, None]
    bias = torch.zeros(future.shape, dtype=dtype, device=query_positions.device).masked_fill_(future, float("-inf"))
    return bias.repeat(group, 1)


def attention_mass(q: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor, kv_length: int,
                   out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q [heads, queries, head_dim] (rotated), keys [kv_heads, slots, head_dim] (rotated; slot j holds
    position j), query_positions [queries] -> [kv_length] float32: for each slot, the softmax attention
    probability the queries give it, causal by position, summed over heads and queries (each query and head
    contributes 1 in all). Grouped-query attention: heads // kv_heads query heads share a KV head.
    Added into `out` when given; `bias`: causal_bias(...) for these queries, when the caller keeps it. Four
    launches (scores with the mask in one batched product, softmax in float32, the sums): the eager probe
    runs it once per layer on few rows (the graphed probe has kernels/probe_attention.py)."""
    heads, queries, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    if bias is None:
        bias = causal_bias(query_positions, kv_length, group, q.dtype)
    grouped = q.reshape(kv_heads, group * queries, head_dim)  # heads h*group .. h*group+group-1 share KV head h
    scores = torch.baddbmm(bias, grouped, keys[:, :kv_length].transpose(1, 2), alpha=head_dim ** -0.5)
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32)
    mass = probabilities.sum(dim=(0, 1))
    if out is None:
        return mass
    return out.add_(mass)


def attention_mass_reference(q: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor, kv_length: int
                             ) -> torch.Tensor:
    """As `attention_mass`, in float64 with the KV heads repeated: what it must equal."""
    group = q.shape[0] // keys.shape[0]
    k = keys[:, :kv_length].double().repeat_interleave(group, dim=0)
    scores = q.double() @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.arange(kv_length, device=q.device)[None, None, :]
                                > query_positions[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1).sum(dim=(0, 1)).float()
