"""Chunk KV placed into a request's cache, keys rotated to the chunk's positions in the prompt, in one pass.

Chunk keys are stored before RoPE, so one stored chunk serves any position. Placing it is: read its keys,
rotate them by the target positions' angles, write them into the request's slots, and copy its values. The
Triton kernel does it in one read and one write per element, all layers (or one, for pipelined loading) in
one launch; `place_reference` is the PyTorch version, used on the CPU and in the tests.

Every forward pass also rotates each layer's fresh queries and keys and stores keys and values into the
request's cache (`rope_store`, one launch per layer). The rotate-half arithmetic is one Triton helper shared
by the kernels.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half convention of Llama-family models: x [..., tokens, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def place_reference(keys: torch.Tensor, values: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor,
                    start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """keys/values [layers, kv_heads, tokens, head_dim] (keys unrotated) into cache_keys/cache_values
    [layers, kv_heads, capacity, head_dim] at slots [start, start + tokens); cos/sin [tokens, head_dim]."""
    span = slice(start, start + keys.shape[2])
    cache_keys[:, :, span] = rotate(keys.to(cache_keys.dtype), cos, sin)
    cache_values[:, :, span] = values.to(cache_values.dtype)


if triton is not None:

    @triton.jit
    def _rotated_halves(x, src, cos, sin, angle, rows, HALF: tl.constexpr):
        """Both halves of the head vectors at x + src rotated by the angles at cos/sin + angle (rotate-half
        RoPE), in float32."""
        x1 = tl.load(x + src, mask=rows).to(tl.float32)
        x2 = tl.load(x + src + HALF, mask=rows).to(tl.float32)
        cos1 = tl.load(cos + angle, mask=rows).to(tl.float32)
        cos2 = tl.load(cos + angle + HALF, mask=rows).to(tl.float32)
        sin1 = tl.load(sin + angle, mask=rows).to(tl.float32)
        sin2 = tl.load(sin + angle + HALF, mask=rows).to(tl.float32)
        return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2

    @triton.jit
    def _place_kernel(keys, values, cache_keys, cache_values, cos, sin, tokens, start,
                      src_layer, src_head, src_token, dst_layer, dst_head, dst_token,
                      KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
        layer_head = tl.program_id(0)
        layer, head = layer_head // KV_HEADS, layer_head % KV_HEADS
        t = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        d = tl.arange(0, HALF)
        rows = t[:, None] < tokens
        src = layer.to(tl.int64) * src_layer + head * src_head + t[:, None].to(tl.int64) * src_token + d[None, :]
        dst = (layer.to(tl.int64) * dst_layer + head * dst_head + (start + t[:, None]).to(tl.int64) * dst_token
               + d[None, :])
        angle = t[:, None] * (2 * HALF) + d[None, :]
        first, second = _rotated_halves(keys, src, cos, sin, angle, rows, HALF)
        out_type = cache_keys.dtype.element_ty
        tl.store(cache_keys + dst, first.to(out_type), mask=rows)
        tl.store(cache_keys + dst + HALF, second.to(out_type), mask=rows)
        v1 = tl.load(values + src, mask=rows)
        v2 = tl.load(values + src + HALF, mask=rows)
        tl.store(cache_values + dst, v1.to(out_type), mask=rows)
        tl.store(cache_values + dst + HALF, v2.to(out_type), mask=rows)

    @triton.jit
    def _place_many_kernel(table, base, cache_keys, cache_values, cos, sin, dst_layer, dst_head, dst_token,
                           KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
                           ALIGN: tl.constexpr):
        # Program (layer and KV head, chunk, block of tokens). A table row per chunk: its keys' and values'
        # offsets from `base` (in elements), first slot, tokens, and strides (layer, head, token), each a
        # multiple of ALIGN elements (checked by the host), so the loads stay vectorised as `place`'s are.
        layer_head = tl.program_id(0)
        row = table + tl.program_id(1) * 7
        tokens = tl.load(row + 3)
        t = tl.program_id(2) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        if tl.program_id(2) * BLOCK_TOKENS < tokens:
            keys = base + tl.multiple_of(tl.load(row), ALIGN)
            values = base + tl.multiple_of(tl.load(row + 1), ALIGN)
            start = tl.load(row + 2)
            layer, head = layer_head // KV_HEADS, layer_head % KV_HEADS
            d = tl.arange(0, HALF)
            rows = t[:, None] < tokens
            src = (layer.to(tl.int64) * tl.multiple_of(tl.load(row + 4), ALIGN)
                   + head * tl.multiple_of(tl.load(row + 5), ALIGN)
                   + t[:, None].to(tl.int64) * tl.multiple_of(tl.load(row + 6), ALIGN) + d[None, :])
            dst = (layer.to(tl.int64) * dst_layer + head * dst_head + (start + t[:, None]).to(tl.int64) * dst_token
                   + d[None, :])
            angle = (start + t[:, None]) * (2 * HALF) + d[None, :]
            first, second = _rotated_halves(keys, src, cos, sin, angle, rows, HALF)
            out_type = cache_keys.dtype.element_ty
            tl.store(cache_keys + dst, first.to(out_type), mask=rows)
            tl.store(cache_keys + dst + HALF, second.to(out_type), mask=rows)
            tl.store(cache_values + dst, tl.load(values + src, mask=rows).to(out_type), mask=rows)
            tl.store(cache_values + dst + HALF, tl.load(values + src + HALF, mask=rows).to(out_type), mask=rows)

    @triton.jit
    def _rope_store_kernel(qkv, q_out, cache_keys, cache_values, cos, sin, slots, tokens, qkv_row, cache_head,
                           cache_slot, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                           BLOCK_TOKENS: tl.constexpr):
        # One program per (head of q, k or v; block of tokens); a qkv row holds the q, then k, then v heads.
        head = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
        d = tl.arange(0, HALF)
        rows = t[:, None] < tokens
        src = t[:, None].to(tl.int64) * qkv_row + head * (2 * HALF) + d[None, :]
        angle = t[:, None] * (2 * HALF) + d[None, :]
        if head < HEADS:
            first, second = _rotated_halves(qkv, src, cos, sin, angle, rows, HALF)
            dst = (head * tokens + t[:, None]).to(tl.int64) * (2 * HALF) + d[None, :]
            tl.store(q_out + dst, first.to(q_out.dtype.element_ty), mask=rows)
            tl.store(q_out + dst + HALF, second.to(q_out.dtype.element_ty), mask=rows)
        else:
            slot = tl.load(slots + t, mask=t < tokens, other=0).to(tl.int64)
            if head < HEADS + KV_HEADS:
                dst = (head - HEADS).to(tl.int64) * cache_head + slot[:, None] * cache_slot + d[None, :]
                first, second = _rotated_halves(qkv, src, cos, sin, angle, rows, HALF)
                tl.store(cache_keys + dst, first.to(cache_keys.dtype.element_ty), mask=rows)
                tl.store(cache_keys + dst + HALF, second.to(cache_keys.dtype.element_ty), mask=rows)
            else:
                dst = (head - HEADS - KV_HEADS).to(tl.int64) * cache_head + slot[:, None] * cache_slot + d[None, :]
                tl.store(cache_values + dst, tl.load(qkv + src, mask=rows), mask=rows)
                tl.store(cache_values + dst + HALF, tl.load(qkv + src + HALF, mask=rows), mask=rows)


def _fits_kernel(keys: torch.Tensor, values: torch.Tensor, cache_keys: torch.Tensor, cos: torch.Tensor) -> bool:
    head_dim = keys.shape[-1]
    return (triton is not None and keys.is_cuda and values.is_cuda and cache_keys.is_cuda
            and head_dim % 2 == 0 and (head_dim // 2) & (head_dim // 2 - 1) == 0  # a power of two half
            and keys.stride() == values.stride() and keys.stride(-1) == 1
            and cache_keys.stride(-1) == 1 and cos.is_contiguous())


def place(keys: torch.Tensor, values: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor,
          start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """As `place_reference`, in one fused pass on CUDA."""
    if not _fits_kernel(keys, values, cache_keys, cos) or cache_keys.stride() != cache_values.stride():
        place_reference(keys, values, cache_keys, cache_values, start, cos, sin)
        return
    layers, kv_heads, tokens, head_dim = keys.shape
    block = 32
    grid = (layers * kv_heads, triton.cdiv(tokens, block))
    _place_kernel[grid](keys, values, cache_keys, cache_values, cos.contiguous(), sin.contiguous(), tokens, start,
                        keys.stride(0), keys.stride(1), keys.stride(2),
                        cache_keys.stride(0), cache_keys.stride(1), cache_keys.stride(2),
                        KV_HEADS=kv_heads, HALF=head_dim // 2, BLOCK_TOKENS=block)


def place_many(chunks: list[tuple[torch.Tensor, torch.Tensor, int]], cache_keys: torch.Tensor,
               cache_values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Several chunks placed as `place` places one: chunks [(keys, values, start)], each keys/values [layers,
    kv_heads, tokens_i, head_dim] (keys unrotated) going to slots [start, start + tokens_i) of cache_keys /
    cache_values [layers, kv_heads, capacity, head_dim]; cos/sin [slots, head_dim]: the angles of slot
    positions 0.. (a rope table; not sliced per chunk). On CUDA one launch for all of them (a table of the
    chunks' offsets from the first one's address, uploaded through engine/staging.py: no host wait; offsets
    and strides in multiples of 16 bytes, as chunk-caches' tensors are, keep the loads vectorised); the host's
    cost per chunk was a launch and a dozen tensor views, about 60 us each on the H200 machine, more than the
    chunk's copy on the GPU (34 us for 512 tokens of Llama-3-8B). Elsewhere, or for chunks the kernel does not
    take (mixed dtypes or devices, keys and values of different strides, unaligned), `place` per chunk."""
    from ..engine.staging import upload

    def one_by_one() -> None:
        for keys, values, start in chunks:
            span = slice(start, start + keys.shape[2])
            place(keys, values, cache_keys, cache_values, start, cos[span], sin[span])

    if not chunks:
        return
    first = chunks[0][0]
    if not all(_fits_kernel(keys, values, cache_keys, cos) and keys.dtype == first.dtype
               and keys.device == cache_keys.device and keys.shape[:2] == cache_keys.shape[:2]
               and keys.shape[3] == cache_keys.shape[3] for keys, values, _ in chunks) \
            or cache_keys.stride() != cache_values.stride() or not sin.is_contiguous():
        one_by_one()
        return
    base = first
    size = first.element_size()
    align = 16 // size  # elements in 16 bytes: what keeps a load vectorised
    gaps = [(keys.data_ptr() - base.data_ptr(), values.data_ptr() - base.data_ptr()) for keys, values, _ in chunks]
    if any(gap % (align * size) for pair in gaps for gap in pair) \
            or any(stride % align for keys, _, _ in chunks for stride in keys.stride()[:3]):
        one_by_one()
        return
    table = torch.tensor([[key_gap // size, value_gap // size, start, keys.shape[2], *keys.stride()[:3]]
                          for (keys, _, start), (key_gap, value_gap) in zip(chunks, gaps)], dtype=torch.int64)
    layers, kv_heads, _, head_dim = cache_keys.shape
    block = 32
    longest = max(keys.shape[2] for keys, _, _ in chunks)
    grid = (layers * kv_heads, len(chunks), triton.cdiv(longest, block))
    _place_many_kernel[grid](upload(table, cache_keys.device), base, cache_keys, cache_values, cos, sin,
                             cache_keys.stride(0), cache_keys.stride(1), cache_keys.stride(2), KV_HEADS=kv_heads,
                             HALF=head_dim // 2, BLOCK_TOKENS=block, ALIGN=align)


def rope_store_reference(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor,
                         cache_keys: torch.Tensor, cache_values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """qkv [tokens, (heads + 2 kv_heads) * head_dim]: one layer's projections, unrotated. Keys rotated by
    cos/sin [tokens, head_dim] and values go into cache_keys/cache_values [kv_heads, capacity, head_dim] at
    `slots` [tokens]; returns the rotated queries [heads, tokens, head_dim]."""
    kv_heads, _, head_dim = cache_keys.shape
    q, k, v = qkv.view(qkv.shape[0], -1, head_dim).transpose(0, 1).split([heads, kv_heads, kv_heads])
    cache_keys[:, slots] = rotate(k, cos, sin).to(cache_keys.dtype)
    cache_values[:, slots] = v.to(cache_values.dtype)
    return rotate(q, cos, sin)


def rope_store(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, cache_keys: torch.Tensor,
               cache_values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """As `rope_store_reference`, one launch on CUDA where PyTorch takes two rotations and two scatters: every
    layer of every forward pass does this, and a blend's sparse layers are short of GPU work."""
    tokens = qkv.shape[0]
    kv_heads, _, head_dim = cache_keys.shape
    half = head_dim // 2
    if (triton is None or not qkv.is_cuda or qkv.stride(-1) != 1 or head_dim % 2 or half & (half - 1)
            or not cos.is_contiguous() or not sin.is_contiguous() or cos.shape != (tokens, head_dim)
            or cache_keys.stride() != cache_values.stride() or cache_keys.stride(-1) != 1
            or cache_keys.dtype != qkv.dtype or cache_values.dtype != qkv.dtype):
        return rope_store_reference(qkv, heads, cos, sin, cache_keys, cache_values, slots)
    q = torch.empty((heads, tokens, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        block = 32
        grid = (heads + 2 * kv_heads, triton.cdiv(tokens, block))
        _rope_store_kernel[grid](qkv, q, cache_keys, cache_values, cos, sin, slots, tokens, qkv.stride(0),
                                 cache_keys.stride(0), cache_keys.stride(1), HEADS=heads, KV_HEADS=kv_heads,
                                 HALF=half, BLOCK_TOKENS=block)
    return q
