"""Which chunk tokens blending recomputes: those whose fresh KV deviates most from their cached KV.

CacheBlend scores each token by how far its freshly computed values at an early layer are from the cached
ones (squared L2 over heads and dimensions) and recomputes the top fraction. The score is one fused
reduction on CUDA (Triton: one read of each input, no float32 copies); top-k is torch's.
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


def select_rows(fresh: torch.Tensor, cached: torch.Tensor, chunk_rows: torch.Tensor, other_rows: torch.Tensor,
                count: int) -> torch.Tensor:
    """Row indices to keep computing, ascending: every row in `other_rows` (not from a chunk) and the `count`
    rows of `chunk_rows` whose values deviate most. Sizes are known on the host, so nothing waits on the GPU."""
    if count == 0:
        return other_rows
    score = deviation(fresh, cached)[chunk_rows]
    chosen = chunk_rows[torch.topk(score, count, sorted=False).indices]
    return torch.cat((chosen, other_rows)).sort().values
