"""The drift shift of blending (chunkcache/blend.py: _DriftShift) in two launches a layer.

A blend recomputes a few chunk tokens; the rest keep the KV their chunk had when computed alone. Much of the
difference between a token's cached and fresh KV is shared by its chunk (the new context moves every key of
the chunk alike), so the chunk's recomputed tokens measure it and the others are moved by a share of it:

1. `drift_deltas`: for each recomputed token, fresh minus cached KV, keys compared before rotation (so the
   deltas of tokens at different positions are in one frame): [tokens, 2 * kv_heads, head_dim] float32, keys'
   heads first. Read before the layer's fresh KV overwrites the cache.
2. the caller averages them per chunk with one matrix product (weights [chunks, tokens] times the deltas as
   [tokens, 2 * kv_heads * head_dim]: token-major, so one product serves every head; a batched product per
   head was cuBLAS's small-matrix kernel, 13 us a layer on the H200 against a few for one product);
3. `drift_apply`: each stale token's chunk mean, times the strength, added to its cached value, and to its
   cached key after rotation to the token's position.

Each has a PyTorch reference (`*_reference`, used on the CPU and by the GPU tests) and a Triton kernel on CUDA.
"""

from __future__ import annotations

import torch

from .rope import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def drift_deltas_reference(qkv: torch.Tensor, rows: torch.Tensor, heads: int, cache_keys: torch.Tensor,
                           cache_values: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> torch.Tensor:
    """qkv [active rows, (heads + 2 kv_heads) * head_dim]: a layer's fresh projections (keys unrotated); rows
    [n] long: the recomputed tokens' rows in it; slots [n]: their cache slots (slot = position); cache_keys
    (rotated) / cache_values [kv_heads, capacity, head_dim] still holding the cached KV; cos/sin
    [positions, head_dim] tables. Returns [n, 2 * kv_heads, head_dim] float32: fresh minus cached keys
    (unrotated), then values."""
    kv_heads, _, head_dim = cache_keys.shape
    fresh = qkv[rows].view(rows.shape[0], -1, head_dim).transpose(0, 1)[heads:].float()  # [2 kv_heads, n, d]
    cached_keys = rotate(cache_keys[:, slots].float(), cos[slots].float(), -sin[slots].float())
    return (fresh - torch.cat((cached_keys, cache_values[:, slots].float()))).transpose(0, 1).contiguous()


def drift_apply_reference(mean: torch.Tensor, chunk_of: torch.Tensor, slots: torch.Tensor, strength: float,
                          cache_keys: torch.Tensor, cache_values: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> None:
    """mean [chunks, 2 * kv_heads, head_dim] float32 (keys unrotated, then values); chunk_of [n] long: each
    stale token's chunk; slots [n]: its slot (= position). Adds strength * its chunk's mean to its value and
    to its key rotated to its position, in place."""
    kv_heads = cache_keys.shape[0]
    shift = mean[chunk_of].transpose(0, 1) * strength
    keys = rotate(shift[:kv_heads], cos[slots].float(), sin[slots].float())
    cache_keys[:, slots] += keys.to(cache_keys.dtype)
    cache_values[:, slots] += shift[kv_heads:].to(cache_values.dtype)


if triton is not None:

    @triton.jit
    def _deltas_kernel(qkv, rows, slots, cache_keys, cache_values, cos, sin, out, tokens, qkv_row, cache_head,
                       cache_slot, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       BLOCK: tl.constexpr):
        head = tl.program_id(0)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HALF)
        valid = t < tokens
        mask = valid[:, None]
        row = tl.load(rows + t, mask=valid, other=0).to(tl.int64)
        slot = tl.load(slots + t, mask=valid, other=0).to(tl.int64)
        key_src = row[:, None] * qkv_row + (HEADS + head) * (2 * HALF) + d[None, :]
        value_src = key_src + KV_HEADS * (2 * HALF)
        cached = head * cache_head + slot[:, None] * cache_slot + d[None, :]
        angle = slot[:, None] * (2 * HALF) + d[None, :]
        c1 = tl.load(cos + angle, mask=mask).to(tl.float32)
        c2 = tl.load(cos + angle + HALF, mask=mask).to(tl.float32)
        s1 = tl.load(sin + angle, mask=mask).to(tl.float32)
        s2 = tl.load(sin + angle + HALF, mask=mask).to(tl.float32)
        k1 = tl.load(cache_keys + cached, mask=mask).to(tl.float32)
        k2 = tl.load(cache_keys + cached + HALF, mask=mask).to(tl.float32)
        # The cached key rotated back (by minus its angle): the frame the fresh, unrotated key is in.
        u1 = k1 * c1 + k2 * s1
        u2 = k2 * c2 - k1 * s2
        f1 = tl.load(qkv + key_src, mask=mask).to(tl.float32)
        f2 = tl.load(qkv + key_src + HALF, mask=mask).to(tl.float32)
        dst = (t[:, None].to(tl.int64) * (2 * KV_HEADS) + head) * (2 * HALF) + d[None, :]
        tl.store(out + dst, f1 - u1, mask=mask)
        tl.store(out + dst + HALF, f2 - u2, mask=mask)
        v1 = tl.load(cache_values + cached, mask=mask).to(tl.float32)
        v2 = tl.load(cache_values + cached + HALF, mask=mask).to(tl.float32)
        g1 = tl.load(qkv + value_src, mask=mask).to(tl.float32)
        g2 = tl.load(qkv + value_src + HALF, mask=mask).to(tl.float32)
        dst = dst + KV_HEADS * (2 * HALF)  # the values' heads follow the keys'
        tl.store(out + dst, g1 - v1, mask=mask)
        tl.store(out + dst + HALF, g2 - v2, mask=mask)

    @triton.jit
    def _apply_kernel(mean, chunk_of, slots, cache_keys, cache_values, cos, sin, strength, tokens, cache_head,
                      cache_slot, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        head = tl.program_id(0)
        t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, HALF)
        valid = t < tokens
        mask = valid[:, None]
        chunk = tl.load(chunk_of + t, mask=valid, other=0).to(tl.int64)
        slot = tl.load(slots + t, mask=valid, other=0).to(tl.int64)
        src = (chunk[:, None] * (2 * KV_HEADS) + head) * (2 * HALF) + d[None, :]
        m1 = tl.load(mean + src, mask=mask) * strength
        m2 = tl.load(mean + src + HALF, mask=mask) * strength
        src = src + KV_HEADS * (2 * HALF)
        n1 = tl.load(mean + src, mask=mask) * strength
        n2 = tl.load(mean + src + HALF, mask=mask) * strength
        angle = slot[:, None] * (2 * HALF) + d[None, :]
        c1 = tl.load(cos + angle, mask=mask).to(tl.float32)
        c2 = tl.load(cos + angle + HALF, mask=mask).to(tl.float32)
        s1 = tl.load(sin + angle, mask=mask).to(tl.float32)
        s2 = tl.load(sin + angle + HALF, mask=mask).to(tl.float32)
        dst = head * cache_head + slot[:, None] * cache_slot + d[None, :]
        k1 = tl.load(cache_keys + dst, mask=mask).to(tl.float32)
        k2 = tl.load(cache_keys + dst + HALF, mask=mask).to(tl.float32)
        out_type = cache_keys.dtype.element_ty
        tl.store(cache_keys + dst, (k1 + m1 * c1 - m2 * s1).to(out_type), mask=mask)
        tl.store(cache_keys + dst + HALF, (k2 + m2 * c2 + m1 * s2).to(out_type), mask=mask)
        v1 = tl.load(cache_values + dst, mask=mask).to(tl.float32)
        v2 = tl.load(cache_values + dst + HALF, mask=mask).to(tl.float32)
        tl.store(cache_values + dst, (v1 + n1).to(out_type), mask=mask)
        tl.store(cache_values + dst + HALF, (v2 + n2).to(out_type), mask=mask)


def _fits(qkv: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor, cos: torch.Tensor) -> bool:
    head_dim = cache_keys.shape[-1]
    half = head_dim // 2
    return (triton is not None and qkv.is_cuda and qkv.stride(-1) == 1 and head_dim % 2 == 0
            and half & (half - 1) == 0 and cache_keys.stride() == cache_values.stride()
            and cache_keys.stride(-1) == 1 and cos.is_contiguous() and cos.shape[-1] == head_dim)


BLOCK = 32


def drift_deltas(qkv: torch.Tensor, rows: torch.Tensor, heads: int, cache_keys: torch.Tensor,
                 cache_values: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """As drift_deltas_reference, one launch on CUDA (into `out` when given: a layer after layer buffer)."""
    if not _fits(qkv, cache_keys, cache_values, cos) or not sin.is_contiguous():
        deltas = drift_deltas_reference(qkv, rows, heads, cache_keys, cache_values, slots, cos, sin)
        return deltas if out is None else out.copy_(deltas)
    kv_heads, _, head_dim = cache_keys.shape
    tokens = rows.shape[0]
    if out is None:
        out = torch.empty((tokens, 2 * kv_heads, head_dim), dtype=torch.float32, device=qkv.device)
    if tokens:
        _deltas_kernel[(kv_heads, triton.cdiv(tokens, BLOCK))](
            qkv, rows, slots, cache_keys, cache_values, cos, sin, out, tokens, qkv.stride(0), cache_keys.stride(0),
            cache_keys.stride(1), HEADS=heads, KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK=BLOCK)
    return out


def drift_apply(mean: torch.Tensor, chunk_of: torch.Tensor, slots: torch.Tensor, strength: float,
                cache_keys: torch.Tensor, cache_values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """As drift_apply_reference, one launch on CUDA."""
    if (not _fits(mean, cache_keys, cache_values, cos) or not sin.is_contiguous() or not mean.is_contiguous()
            or mean.dtype != torch.float32):
        drift_apply_reference(mean, chunk_of, slots, strength, cache_keys, cache_values, cos, sin)
        return
    kv_heads, _, head_dim = cache_keys.shape
    tokens = slots.shape[0]
    if tokens:
        _apply_kernel[(kv_heads, triton.cdiv(tokens, BLOCK))](
            mean, chunk_of, slots, cache_keys, cache_values, cos, sin, float(strength), tokens,
            cache_keys.stride(0), cache_keys.stride(1), KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK=BLOCK)
