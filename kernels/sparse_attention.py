"""Attention of a sparse, sorted set of query tokens over a request's KV slots, causal by position, in Triton.

Blending recomputes ~15% of a prompt's tokens: those queries sit at scattered positions and each sees every
slot at or before its own position (slots hold positions in order: slot j is position j). flex_attention
with a block mask computes this but measured slower on the H100 than FlashAttention on the whole prompt
(bench/kernel_times.py), so this is a FlashAttention-style forward for that one pattern: each program takes a
block of queries of one head, walks the key blocks up to the block's last query position (not beyond, so
keys after every query are never read), and masks only by position. Grouped-query heads read their shared
KV head directly.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

# (BLOCK_M, BLOCK_N, num_warps, num_stages): chosen on the H100 by bench/kernel_times.py's sweep.
DEFAULT_CONFIG = (64, 64, 4, 3)

if triton is not None:

    @triton.jit
    def _sparse_causal_kernel(q, k, v, query_positions, block_ends, out, scale, queries,
                              q_head, q_row, k_head, k_row, v_head, v_row, o_head, o_row,
                              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        block = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        valid = rows < queries
        positions = tl.load(query_positions + rows, mask=valid, other=-1)
        query = tl.load(q + head * q_head + rows[:, None].to(tl.int64) * q_row + dims[None, :], mask=valid[:, None],
                        other=0.0)
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        scale_log2 = scale * 1.4426950408889634  # softmax in base 2
        end = tl.load(block_ends + block)  # no query of this block sees a slot past its last position
        key_base = k + kv_head * k_head
        value_base = v + kv_head * v_head
        for start in range(0, end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            in_range = cols < end
            keys = tl.load(key_base + cols[None, :].to(tl.int64) * k_row + dims[:, None], mask=in_range[None, :],
                           other=0.0)
            scores = tl.dot(query, keys) * scale_log2
            scores = tl.where(cols[None, :] <= positions[:, None], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            new_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that see nothing yet
            weights = tl.exp2(scores - new_max[:, None])
            correction = tl.exp2(running_max - new_max)
            running_sum = running_sum * correction + tl.sum(weights, 1)
            values = tl.load(value_base + cols[:, None].to(tl.int64) * v_row + dims[None, :], mask=in_range[:, None],
                             other=0.0)
            acc = acc * correction[:, None]
            acc = tl.dot(weights.to(values.dtype), values, acc)
            running_max = new_max
        acc = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
        tl.store(out + head * o_head + rows[:, None].to(tl.int64) * o_row + dims[None, :],
                 acc.to(out.dtype.element_ty), mask=valid[:, None])


def supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and keys.dtype == q.dtype and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and q.shape[0] % keys.shape[0] == 0)


def block_ends(query_positions: torch.Tensor, block_m: int = DEFAULT_CONFIG[0]) -> torch.Tensor:
    """Per block of `block_m` queries, one past its last position: how far that block reads the slots.
    Computed once per forward pass and shared by every layer."""
    queries = query_positions.shape[0]
    padded = torch.nn.functional.pad(query_positions, (0, -queries % block_m), value=-1)
    return (padded.view(-1, block_m).amax(dim=1) + 1).to(torch.int32)


def sparse_causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            query_positions: torch.Tensor, ends: torch.Tensor | None = None,
                            config: tuple[int, int, int, int] = DEFAULT_CONFIG, out: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """q [heads, queries, head_dim] at `query_positions` (ascending for speed; any order is correct);
    keys/values [kv_heads, slots, head_dim] with slot j at position j; `ends` from block_ends (same block
    size as the config's). Returns [heads, queries, head_dim] (in `out` when given)."""
    heads, queries, head_dim = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    block_m, block_n, warps, stages = config
    if ends is None:
        ends = block_ends(query_positions, block_m)
    grid = (triton.cdiv(queries, block_m), heads)
    _sparse_causal_kernel[grid](q, keys, values, query_positions, ends, out, head_dim ** -0.5, queries,
                                q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0),
                                values.stride(1), out.stride(0), out.stride(1), GROUP=heads // keys.shape[0],
                                HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
                                num_stages=stages)
    return out
