"""Decode attention over a paged KV pool: each request's one new query over its own KV, a batch in one launch.

The batched decode (engine/decode.py) keeps every running request's KV in one pool of slots grouped into
blocks of `page` tokens (engine/kv_pool.py); request b's position p lives at slot
block_tables[b, p // page] * page + p % page, and it sees its first lengths[b] positions. A decode step's query
is one token per request, far too little work for a prefill kernel, so this is flash-decoding (Dao et al.,
"Flash-Decoding for long-context inference", 2023; SGLang's triton decode attention does the same): every
request's KV is split into `splits` parts, one program per (request, KV head, part) computes the attention of
the KV head's query heads (GQA: the group's rows side by side, so each key is read once) over its part with an
online softmax, and a second kernel merges the parts by their log-sum-exp. Lengths live on the GPU and the
grid is fixed by the batch size, so a CUDA graph replays it for any lengths.

`decode_attention_reference` is the PyTorch version (the CPU path, and what the kernel is tested against).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK_N = 64  # keys per inner iteration
TARGET_PROGRAMS = 512  # splits are chosen so that a step runs about this many programs (the H200 has 132 SMs)
MAX_SPLITS = 64


def num_splits(batch: int, kv_heads: int) -> int:
    """Parts each request's KV is split into: enough programs to fill the GPU at small batches, a power of two.
    A function of the shapes only, so eager and graph-captured steps of one batch size split alike."""
    wanted = max(1, TARGET_PROGRAMS // max(1, batch * kv_heads))
    return min(MAX_SPLITS, 1 << (wanted.bit_length() - 1))


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                               lengths: torch.Tensor, page: int) -> torch.Tensor:
    """q [batch, heads, head_dim]; keys/values [kv_heads, slots, head_dim] (the pool's layer); block_tables
    [batch, max_blocks] int; lengths [batch] int (positions each request sees, >= 1). Returns [batch, heads,
    head_dim] in q's dtype: softmax(q k^T / sqrt(head_dim)) v over each request's own slots, in position order."""
    out = torch.empty_like(q)
    for b, length in enumerate(lengths.tolist()):
        positions = torch.arange(length, device=q.device)
        slots = block_tables[b, positions // page].long() * page + positions % page
        k, v = keys[:, slots], values[:, slots]
        out[b] = F.scaled_dot_product_attention(q[b][:, None], k, v, enable_gqa=q.shape[1] != keys.shape[0])[:, 0]
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(q, keys, values, block_tables, lengths, partial_out, partial_lse, scale,
                      q_batch, q_head, kv_head_stride, kv_slot, table_row, SPLITS: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + h
        rows = h < GROUP
        length = tl.load(lengths + b)
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        query = tl.load(q + b.to(tl.int64) * q_batch + heads[:, None] * q_head + d[None, :], mask=rows[:, None],
                        other=0.0)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
        head_base = kv_head.to(tl.int64) * kv_head_stride
        for n in range(start, end, BLOCK_N):
            t = n + tl.arange(0, BLOCK_N)
            inside = t < end
            block = tl.load(block_tables + b.to(tl.int64) * table_row + t // PAGE, mask=inside, other=0)
            slot = block.to(tl.int64) * PAGE + t % PAGE
            k = tl.load(keys + head_base + slot[:, None] * kv_slot + d[None, :], mask=inside[:, None], other=0.0)
            scores = tl.dot(query, tl.trans(k)).to(tl.float32) * scale  # [BLOCK_H, BLOCK_N], log2 units
            scores = tl.where(inside[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            correction = tl.exp2(m - m_new)
            p = tl.exp2(scores - m_new[:, None])
            s = s * correction + tl.sum(p, axis=1)
            v = tl.load(values + head_base + slot[:, None] * kv_slot + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m = m_new
        # An empty part (start >= end) leaves m = -inf and s = 0: the merge gives it no weight.
        lse = tl.where(s > 0, m + tl.log2(tl.where(s > 0, s, 1.0)), float("-inf"))
        out = acc / tl.where(s > 0, s, 1.0)[:, None]
        base = (b.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * SPLITS + split
        tl.store(partial_out + base[:, None] * HEAD_DIM + d[None, :], out, mask=rows[:, None])
        tl.store(partial_lse + base, lse, mask=rows)

    @triton.jit
    def _merge_kernel(partial_out, partial_lse, out, out_batch, out_head, HEADS: tl.constexpr,
                      SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        parts = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        base = (b.to(tl.int64) * HEADS + head) * SPLITS
        lse = tl.load(partial_lse + base + parts)
        weights = tl.exp2(lse - tl.max(lse, axis=0))
        values = tl.load(partial_out + (base + parts)[:, None] * HEAD_DIM + d[None, :])
        merged = tl.sum(values * weights[:, None], axis=0) / tl.sum(weights, axis=0)
        tl.store(out + b.to(tl.int64) * out_batch + head * out_head + d, merged.to(out.dtype.element_ty))


def supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    head_dim = q.shape[-1]
    return (triton is not None and q.is_cuda and keys.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and keys.dtype == q.dtype and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and q.stride(-1) == 1 and keys.stride(-1) == 1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor, page: int, out: torch.Tensor | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """As `decode_attention_reference`, flash-decoding on CUDA (half precision, a power-of-two head_dim);
    `out` [batch, heads, head_dim] (any strides with a unit last one) is written when given. No host sync: the
    lengths are read on the GPU (they must be >= 1 and within each block table)."""
    if not supported(q, keys) or keys.stride() != values.stride():
        result = decode_attention_reference(q, keys, values, block_tables, lengths, page)
        if out is None:
            return result
        return out.copy_(result)
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    splits = splits or num_splits(batch, kv_heads)
    if out is None:
        out = torch.empty_like(q)
    partial_out = torch.empty((batch, heads, splits, head_dim), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((batch, heads, splits), dtype=torch.float32, device=q.device)
    scale = math.log2(math.e) / math.sqrt(head_dim)
    _split_kernel[(batch, kv_heads, splits)](
        q, keys, values, block_tables, lengths, partial_out, partial_lse, scale, q.stride(0), q.stride(1),
        keys.stride(0), keys.stride(1), block_tables.stride(0), SPLITS=splits, GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page, BLOCK_N=BLOCK_N,
        num_warps=4, num_stages=2)
    _merge_kernel[(batch, heads)](partial_out, partial_lse, out, out.stride(0), out.stride(1), HEADS=heads,
                                  SPLITS=splits, HEAD_DIM=head_dim)
    return out
