"""Attention of a request's query tokens over its KV cache, causal by position.

Four shapes occur, and each goes to the fastest kernel that computes it exactly:
- "causal": a prefill from an empty cache, queries = every slot in position order -> SDPA with is_causal
  (FlashAttention on CUDA);
- "all": one decoded token that sees every slot -> SDPA without a mask;
- "sparse": queries at any positions over slots that hold positions in order (slot j = position j), each
  seeing the slots up to its own position: blending's selected tokens, a prompt continuing a cached
  prefix. On CUDA a Triton kernel (settings.py's sparse_kernel: probe_attention.grouped_causal_attention by
  default where its blocks fill the GPU, else sparse_attention.py's; flex_attention measured slower there);
- "masked": the general case, slots in any order: flex_attention with a block mask built from the positions
  on CUDA (blocks wholly in a query block's future skipped, wholly visible ones unmasked), SDPA with a
  boolean mask elsewhere. BLENDGATE_ATTENTION=flex or sdpa (settings.py) sends the sparse shape here too.

SDPA runs on FlashAttention (or the memory-efficient or math kernels), never cuDNN's: cuDNN rebuilds its
plan for every new sequence length, about 20 ms of host time per call on the H100 (bench/profile_blend.py),
which a decode step (one new length per token) pays on every layer.

A plan is built once per forward pass and shared by every layer, like the batch metadata SGLang passes down
its forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import probe_attention, sparse_attention
from .settings import kernel_settings

BLOCK = 128  # flex_attention's block size (queries and keys)
_FAR = 2**62  # position of padding keys: after every query


@dataclass
class AttentionPlan:
    kind: Literal["causal", "all", "sparse", "masked"]
    kv_length: int
    mask: torch.Tensor | None = None  # [queries, slots] bool, the SDPA form of "masked"
    block_mask: object | None = None  # flex_attention's BlockMask, the CUDA form of "masked"
    # flex_attention runs whole query blocks: queries are padded to this many (rows that see nothing).
    padded_queries: int = 0
    query_positions: torch.Tensor | None = None  # the sparse shape's
    block_ends: torch.Tensor | None = None  # the sparse kernel's per-block reach, shared by every layer


_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_backend(device: torch.device) -> str:
    """"flex" or "sdpa": which kernel runs the masked shape on this device."""
    wanted = kernel_settings().attention
    if wanted == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return wanted


def plan_sparse(query_positions: torch.Tensor, kv_length: int) -> AttentionPlan:
    """Queries at `query_positions` over slots 0..kv_length-1 holding positions 0..kv_length-1."""
    if query_positions.is_cuda and sparse_attention.triton is not None and kernel_settings().attention == "auto":
        return AttentionPlan("sparse", kv_length, query_positions=query_positions,
                             block_ends=sparse_attention.block_ends(query_positions))
    return plan_masked(query_positions, torch.arange(kv_length, device=query_positions.device))


def plan_causal(kv_length: int) -> AttentionPlan:
    return AttentionPlan("causal", kv_length)


def plan_all(kv_length: int) -> AttentionPlan:
    return AttentionPlan("all", kv_length)


def plan_masked(query_positions: torch.Tensor, slot_positions: torch.Tensor, backend: str | None = None
                ) -> AttentionPlan:
    """Queries at `query_positions` over slots holding `slot_positions` (any order)."""
    backend = backend or masked_backend(query_positions.device)
    kv_length = slot_positions.shape[0]
    if backend == "sdpa":
        return AttentionPlan("masked", kv_length, mask=slot_positions[None, :] <= query_positions[:, None])
    padded = -(-query_positions.shape[0] // BLOCK) * BLOCK
    return AttentionPlan("masked", kv_length, block_mask=position_block_mask(query_positions, slot_positions),
                         padded_queries=padded)


def position_block_mask(query_positions: torch.Tensor, slot_positions: torch.Tensor):
    """A BlockMask for "slot visible when its position <= the query's", from per-block position ranges: a key
    block is skipped when all its positions are after every query of the block, run unmasked when all are
    at or before every query, and masked element by element otherwise. Built with a few tensor ops (no
    sync, no compilation), so a new prompt length costs nothing here."""
    from torch.nn.attention.flex_attention import BlockMask

    queries, slots = query_positions.shape[0], slot_positions.shape[0]
    q_blocks, kv_blocks = -(-queries // BLOCK), -(-slots // BLOCK)
    queries_padded = q_blocks * BLOCK  # whole blocks: flex_attention's decoding kernel (under one block of
    # queries) fails to compile for dynamic shapes in torch 2.11, and whole blocks keep shapes few
    q_pos = F.pad(query_positions.long(), (0, q_blocks * BLOCK - queries), value=-1)
    kv_pos = F.pad(slot_positions.long(), (0, kv_blocks * BLOCK - slots), value=_FAR)
    q_blocked, kv_blocked = q_pos.view(q_blocks, BLOCK), kv_pos.view(kv_blocks, BLOCK)
    q_max = q_blocked.max(dim=1).values
    q_min = q_blocked.masked_fill(q_blocked < 0, _FAR).min(dim=1).values
    kv_min = kv_blocked.min(dim=1).values
    kv_max = kv_blocked.max(dim=1).values  # _FAR where the block has padding: never "full"
    some = kv_min[None, :] <= q_max[:, None]
    full = kv_max[None, :] <= q_min[:, None]
    if queries % BLOCK:
        full[-1] = False  # padding queries see nothing, so the last query block is never wholly visible
    partial = some & ~full

    def blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = chosen.sum(dim=1, dtype=torch.int32)
        order = torch.argsort(chosen.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def visible(batch, head, q_index, kv_index):
        return kv_pos[kv_index] <= q_pos[q_index]

    partial_counts, partial_order = blocks(partial)
    full_counts, full_order = blocks(full)
    return BlockMask.from_kv_blocks(partial_counts, partial_order, full_counts, full_order, BLOCK_SIZE=BLOCK,
                                    mask_mod=visible, seq_lengths=(queries_padded, slots))


_compiled_flex = None


def _flex(q, k, v, block_mask, gqa: bool):
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic: one compiled kernel serves every prompt length (no recompilation per request).
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """q [heads, queries, head_dim]; keys/values [kv_heads, slots, head_dim] (the plan's kv_length valid
    slots). Returns [heads, queries, head_dim] (a view: its memory may be token-major)."""
    gqa = q.shape[0] != keys.shape[0]
    keys, values = keys[:, : plan.kv_length], values[:, : plan.kv_length]
    if plan.kind == "sparse" and sparse_attention.supported(q, keys):
        # Written token-major, so the caller's [tokens, heads * head_dim] view of it needs no copy.
        out = torch.empty((q.shape[1], q.shape[0], q.shape[2]), dtype=q.dtype, device=q.device).transpose(0, 1)
        if kernel_settings().sparse_kernel == "grouped" and probe_attention.grouped_fills_gpu(
                q.shape[0], keys.shape[0], q.shape[1]):
            return probe_attention.grouped_causal_attention(q, keys, values, plan.query_positions, out=out)
        return sparse_attention.sparse_causal_attention(q, keys, values, plan.query_positions, plan.block_ends,
                                                        out=out)
    if plan.block_mask is not None:
        queries = q.shape[1]
        if plan.padded_queries > queries:
            q = torch.nn.functional.pad(q, (0, 0, 0, plan.padded_queries - queries))
        return _flex(q[None], keys[None], values[None], plan.block_mask, gqa)[0, :, :queries]
    mask = plan.mask
    if plan.kind == "sparse":  # e.g. float32 on CUDA: SDPA with the mask the kernel would apply
        mask = torch.arange(plan.kv_length, device=q.device)[None, :] <= plan.query_positions[:, None]
    with sdpa_kernel(_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q[None], keys[None], values[None], is_causal=plan.kind == "causal",
                                             attn_mask=None if mask is None else mask[None, None], enable_gqa=gqa)
    return out[0]


def reference_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, query_positions: torch.Tensor,
                        slot_positions: torch.Tensor) -> torch.Tensor:
    """Plain float64 attention, causal by position: what every path above must equal."""
    group = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)
    v = values.double().repeat_interleave(group, dim=0)
    scores = q.double() @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(slot_positions[None, None, :] > query_positions[None, :, None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
