"""The probe pass's attention in one go: the rows' attention output and the question's attention mass per slot.

Query-aware selection (chunkcache/probe.py) runs a few dozen rows (segment markers and the question) through
every layer over a prompt's cached KV. At each layer those rows need their attention output (for the next
layer) and the voting rows' softmax probabilities summed per slot (the score blending selects by;
kernels/selection.attention_mass). Done apart, a FlashAttention-style kernel walks thousands of slots with one
program per head (a few dozen programs on a GPU of 132 SMs) and the mass goes through a float32 score matrix
in HBM: 126 us a layer for Llama-3-8B shapes on the H200, against 125 us for all the layer's weights
(bench/results/ttft-2026-11-30.md's profile). Here, as in flash-decoding (split-K), the slots are split
among many programs, and the mass reuses the softmax statistics:

1. `_partial_kernel`, grid (KV heads x row blocks, splits): each program takes BLOCK_M of a KV head's
   (query head, row) pairs over one span of slots and writes its running max, sum and unnormalised output;
2. `_combine_kernel`: per (head, row), the splits combined into the output and the row's softmax max and sum;
3. `_mass_kernel`, grid (slot blocks, KV heads): the voting rows' scores over a block of slots again,
   exp(score - max) / sum weighted per row, summed over rows and the KV head's query heads, one partial row
   per KV head; `_mass_add_kernel` adds the partial rows into the mass in a fixed order (no atomics: the same
   sums every run).

Causal by position: slot j holds position j and a row at position p sees slots 0..p. Scores in float32 from
bf16/fp16 inputs (tl.dot); the softmax in base 2, as FlashAttention does.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK_M = 64  # (query head, row) pairs per program of the partial pass
BLOCK_N = 64  # slots per step
MASS_BLOCK_N = 64  # slots per program of the mass pass
TARGET_PROGRAMS = 264  # partial-pass programs aimed at (two per SM of an H100/H200)

if triton is not None:

    @triton.jit
    def _partial_kernel(q, k, v, positions, part_max, part_sum, part_out, out, scale_log2, rows, kv_length, span,
                        splits, q_head, q_row, k_head, k_row, v_head, v_row, o_head, o_row,
                        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, DIRECT: tl.constexpr):
        # A block holds BLOCK_M // GROUP rows, each with the GROUP query heads of one KV head (row-major
        # pairs): the keys and values it loads serve every head of the group, and rows sorted by position
        # keep each block's reach short. DIRECT (one split): the output normalised and stored here.
        program = tl.program_id(0)
        split = tl.program_id(1)
        blocks = tl.cdiv(GROUP * rows, BLOCK_M)
        # The last blocks (rows furthest into the prompt, when sorted) walk the most slots: they start first,
        # and the short ones fill in behind them.
        kv_head = program % KV_HEADS
        pairs = (blocks - 1 - program // KV_HEADS) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = pairs < GROUP * rows
        head = kv_head * GROUP + pairs % GROUP
        row = pairs // GROUP
        dims = tl.arange(0, HEAD_DIM)
        pos = tl.load(positions + row, mask=valid, other=-1)
        query = tl.load(q + head[:, None].to(tl.int64) * q_head + row[:, None].to(tl.int64) * q_row + dims[None, :],
                        mask=valid[:, None], other=0.0)
        running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        start = split * span
        stop = tl.minimum(start + span, kv_length)
        stop = tl.minimum(stop, tl.max(pos, 0) + 1)  # no row of this block sees a slot past its last position
        key_base = k + kv_head * k_head
        value_base = v + kv_head * v_head
        for first in range(start, stop, BLOCK_N):
            cols = first + tl.arange(0, BLOCK_N)
            in_range = cols < stop
            keys = tl.load(key_base + cols[None, :].to(tl.int64) * k_row + dims[:, None], mask=in_range[None, :],
                           other=0.0)
            scores = tl.dot(query, keys) * scale_log2
            scores = tl.where((cols[None, :] <= pos[:, None]) & in_range[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that see nothing yet
            weights = tl.exp2(scores - safe_max[:, None])
            correction = tl.exp2(running_max - safe_max)
            running_sum = running_sum * correction + tl.sum(weights, 1)
            values = tl.load(value_base + cols[:, None].to(tl.int64) * v_row + dims[None, :],
                             mask=in_range[:, None], other=0.0)
            acc = acc * correction[:, None]
            acc = tl.dot(weights.to(values.dtype), values, acc)
            running_max = new_max
        if DIRECT:
            acc = acc / tl.where(running_sum == 0.0, 1.0, running_sum)[:, None]
            tl.store(out + head[:, None].to(tl.int64) * o_head + row[:, None].to(tl.int64) * o_row + dims[None, :],
                     acc.to(out.dtype.element_ty), mask=valid[:, None])
        else:
            index = (head.to(tl.int64) * rows + row) * splits + split  # [heads, rows, splits]
            tl.store(part_max + index, running_max, mask=valid)
            tl.store(part_sum + index, running_sum, mask=valid)
            tl.store(part_out + index[:, None] * HEAD_DIM + dims[None, :], acc, mask=valid[:, None])

    @triton.jit
    def _combine_kernel(part_max, part_sum, part_out, out, row_max, row_sum, pairs_total, rows, splits,
                        o_head, o_row, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
        pairs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (head, row) flattened
        valid = pairs < pairs_total
        split = tl.arange(0, SPLITS)
        dims = tl.arange(0, HEAD_DIM)
        index = pairs[:, None].to(tl.int64) * splits + split[None, :]
        present = valid[:, None] & (split[None, :] < splits)
        maxes = tl.load(part_max + index, mask=present, other=float("-inf"))
        sums = tl.load(part_sum + index, mask=present, other=0.0)
        top = tl.max(maxes, 1)
        top = tl.where(top == float("-inf"), 0.0, top)
        scale = tl.exp2(maxes - top[:, None])  # 0 for splits that saw nothing
        total = tl.sum(sums * scale, 1)
        acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
        for s in range(0, splits):
            weight = tl.exp2(tl.load(part_max + pairs.to(tl.int64) * splits + s, mask=valid, other=float("-inf"))
                             - top)
            part = tl.load(part_out + (pairs[:, None].to(tl.int64) * splits + s) * HEAD_DIM + dims[None, :],
                           mask=valid[:, None], other=0.0)
            acc += part * weight[:, None]
        acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        head = pairs // rows
        row = pairs % rows
        tl.store(out + head[:, None].to(tl.int64) * o_head + row[:, None].to(tl.int64) * o_row + dims[None, :],
                 acc.to(out.dtype.element_ty), mask=valid[:, None])
        tl.store(row_max + pairs, top, mask=valid)
        tl.store(row_sum + pairs, total, mask=valid)

    @triton.jit
    def _mass_kernel(q, k, positions, weights, row_max, row_sum, mass_part, scale_log2, rows, first_vote,
                     kv_length, q_head, q_row, k_head, k_row, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One KV head's voting (row, query head) pairs, row-major, against one block of slots.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_head = tl.program_id(1)
        in_range = cols < kv_length
        dims = tl.arange(0, HEAD_DIM)
        keys = tl.load(k + kv_head * k_head + cols[None, :].to(tl.int64) * k_row + dims[:, None],
                       mask=in_range[None, :], other=0.0)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        voting = GROUP * (rows - first_vote)
        for first in range(0, voting, BLOCK_M):
            pairs = first + tl.arange(0, BLOCK_M)
            valid = pairs < voting
            row = first_vote + pairs // GROUP
            head = kv_head * GROUP + pairs % GROUP
            pos = tl.load(positions + row, mask=valid, other=-1)
            share = tl.load(weights + row, mask=valid, other=0.0)
            top = tl.load(row_max + head * rows + row, mask=valid, other=0.0)
            norm = tl.load(row_sum + head * rows + row, mask=valid, other=1.0)
            query = tl.load(q + head[:, None].to(tl.int64) * q_head + row[:, None].to(tl.int64) * q_row
                            + dims[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(query, keys) * scale_log2
            seen = (cols[None, :] <= pos[:, None]) & in_range[None, :] & valid[:, None]
            p = tl.where(seen, tl.exp2(scores - top[:, None]), 0.0)
            p = p * (share / tl.where(norm == 0.0, 1.0, norm))[:, None]
            total += tl.sum(p, 0)
        tl.store(mass_part + kv_head * kv_length + cols, total, mask=in_range)

    @triton.jit
    def _mass_add_kernel(mass_part, mass, kv_length, KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr):
        # The KV heads' partial masses summed in a fixed order and added into the mass.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_range = cols < kv_length
        total = tl.load(mass + cols, mask=in_range, other=0.0)
        for kv_head in range(KV_HEADS):
            total += tl.load(mass_part + kv_head * kv_length + cols, mask=in_range, other=0.0)
        tl.store(mass + cols, total, mask=in_range)


def supported(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernels take these inputs: Triton present, CUDA half-precision tensors, a power-of-two head
    size, query heads a multiple of KV heads."""
    head_dim = q.shape[-1]
    return (triton is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and keys.dtype == q.dtype and head_dim >= 16 and head_dim & (head_dim - 1) == 0
            and q.shape[0] % keys.shape[0] == 0)


def _splits(kv_length: int, programs_per_split: int) -> tuple[int, int]:
    """(splits, span): how the slots are cut so the partial pass runs about TARGET_PROGRAMS programs."""
    blocks = -(-kv_length // BLOCK_N)
    splits = max(1, min(blocks, TARGET_PROGRAMS // max(1, programs_per_split)))
    span = -(-blocks // splits) * BLOCK_N
    return -(-kv_length // span), span


def probe_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    weights: torch.Tensor, first_vote: int, kv_length: int, mass: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q [heads, rows, head_dim] (rotated) at `positions` [rows] (long, any order); keys, values [kv_heads,
    slots, head_dim] (keys rotated; slot j holds position j; the first `kv_length` slots read). Returns the
    rows' attention output [heads, rows, head_dim] (in `out` when given), causal by position, and adds into
    `mass` [kv_length] float32 the attention probability each slot gets from rows first_vote.. (the voting
    rows), each weighted by `weights` [rows] float32, summed over heads: what
    `kernels.selection.attention_mass(q[:, first_vote:], keys, positions[first_vote:], kv_length,
    weights=weights[first_vote:])` adds. Shapes and dtypes as `supported` says; no host synchronisation (CUDA
    graphs may capture it). Reference: `probe_attention_reference`."""
    heads, rows, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    device = q.device
    blocks = -(-group * rows // BLOCK_M)
    splits, span = _splits(kv_length, kv_heads * blocks)
    part_max = torch.empty(heads * rows * splits, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    part_out = torch.empty(heads * rows * splits * head_dim, dtype=torch.float32, device=device)
    scale_log2 = head_dim ** -0.5 * 1.4426950408889634
    _partial_kernel[(kv_heads * blocks, splits)](
        q, keys, values, positions, part_max, part_sum, part_out, out, scale_log2, rows, kv_length, span, splits,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        out.stride(0), out.stride(1), KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N, DIRECT=False, num_warps=4, num_stages=2)
    row_max = torch.empty(heads * rows, dtype=torch.float32, device=device)
    row_sum = torch.empty_like(row_max)
    block_r = 16
    _combine_kernel[(triton.cdiv(heads * rows, block_r),)](
        part_max, part_sum, part_out, out, row_max, row_sum, heads * rows, rows, splits, out.stride(0),
        out.stride(1), HEAD_DIM=head_dim, SPLITS=max(2, triton.next_power_of_2(splits)), BLOCK_R=block_r,
        num_warps=4)
    if first_vote < rows:
        mass_part = torch.empty(kv_heads, kv_length, dtype=torch.float32, device=device)
        _mass_kernel[(triton.cdiv(kv_length, MASS_BLOCK_N), kv_heads)](
            q, keys, positions, weights, row_max, row_sum, mass_part, scale_log2, rows, first_vote, kv_length,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), GROUP=group, HEAD_DIM=head_dim,
            BLOCK_M=BLOCK_M, BLOCK_N=MASS_BLOCK_N, num_warps=4)
        _mass_add_kernel[(triton.cdiv(kv_length, 1024),)](mass_part, mass, kv_length, KV_HEADS=kv_heads,
                                                          BLOCK_N=1024, num_warps=4)
    return out


def grouped_fills_gpu(heads: int, kv_heads: int, rows: int) -> bool:
    """Whether grouped_causal_attention's blocks of `rows` rows fill the GPU (TARGET_PROGRAMS programs). With
    fewer (a question over reused chunks: 32 rows make 16 blocks), the blocked kernel's one block per query
    head runs more programs, in one launch; splitting the slots as probe_attention does takes two, and eager
    passes of few rows are bound by the host's launches."""
    return kv_heads * -(-heads // kv_heads * rows // BLOCK_M) >= TARGET_PROGRAMS


def grouped_causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                             out: torch.Tensor | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
                             warps: int = 4, stages: int = 3) -> torch.Tensor:
    """Attention of rows at `positions` (ascending for speed; any order is correct) over slots 0..max(position)
    (slot j holds position j), each row seeing the slots up to its own position: q [heads, rows, head_dim]
    (rotated), keys/values [kv_heads, slots, head_dim] -> [heads, rows, head_dim] (in `out` when given). The
    partial pass of probe_attention with one split, normalising in place: a block holds block_m // group rows
    with all the query heads of one KV head, so each key and value loaded serves the whole group (the
    blocked kernel of sparse_attention.py loads them once per query head). `grouped_fills_gpu` says whether
    the rows are enough to give every SM work this way. (Splitting the slots as probe_attention does, in 2-4
    spans combined after, measured slower for the blend's 710 rows of Llama-3-8B on the H200: 0.132-0.138 ms
    against 0.102; bench/results/ttft-2026-12-01.md.)"""
    heads, rows, head_dim = q.shape
    kv_heads, kv_length = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    blocks = -(-group * rows // block_m)
    empty = q.new_empty(0, dtype=torch.float32)
    _partial_kernel[(kv_heads * blocks, 1)](
        q, keys, values, positions, empty, empty, empty, out, head_dim ** -0.5 * 1.4426950408889634, rows,
        kv_length, kv_length, 1, q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0),
        values.stride(1), out.stride(0), out.stride(1), KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, DIRECT=True, num_warps=warps, num_stages=stages)
    return out


def probe_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                              weights: torch.Tensor, first_vote: int, kv_length: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """What probe_attention computes, in float64 with the KV heads repeated: (out [heads, rows, head_dim] in
    q's dtype, mass [kv_length] float32)."""
    group = q.shape[0] // keys.shape[0]
    k = keys[:, :kv_length].double().repeat_interleave(group, dim=0)
    v = values[:, :kv_length].double().repeat_interleave(group, dim=0)
    scores = q.double() @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.arange(kv_length, device=q.device)[None, None, :] > positions[None, :, None],
                                float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    out = (probabilities @ v).to(q.dtype)
    voting = probabilities[:, first_vote:] * weights[first_vote:].double()[None, :, None]
    return out, voting.sum(dim=(0, 1)).float()
