"""SpeCache's residency update in one launch: the wanted KV pairs made resident in a request's top-k slots.

SpeCache (arXiv 2503.16163, engine/specache.py) reads, per decode step, layer and KV head, the top-k positions
its low-bit keys score best; the GPU budget's top-k slots hold some of them already (prefetched by the
previous step's prediction). `make_resident` marks those hits, chooses free slots among the slots whose pairs
are not wanted (the lowest first, so a growing set of wanted pairs stays a prefix of the slots), copies the
missed pairs' keys and values from the host tier (pinned host memory on CUDA: the kernel's loads cross PCIe,
as kernels/pair_copy.py's do) into those slots' pool rows, updates the residency table, and adds the hit and
copied counts to a device counter. Nothing is read back to the host.

Layout, for one layer of one request: `wanted` [kv_heads, m] long, distinct positions per row (m <= top_k);
`resident` [kv_heads, top_k] long, the position each top-k slot holds (-1: none), updated in place; `targets`
[top_k] long, the pool slot of each top-k slot; `host_keys`/`host_values` [kv_heads, capacity, head_dim];
`pool_keys`/`pool_values` [kv_heads, slots, head_dim]; `counts` [2] long, += (hits, pairs copied).

The Triton kernel runs one program per KV head in passes over index blocks of 1,024 (a block barrier between
them, so a 32k context's top-k takes two iterations a pass): mark the wanted positions in a per-position
scratch (`ResidencyScratch.marks`), mark those a slot already holds, rank the free slots, then rank the misses
(prefix sums) and give the i-th miss the i-th free slot, updating the table and clearing the marks behind it;
a last pass copies the misses' pairs, 64 rows of keys and values in flight at a time. That is the reference's
assignment exactly (`make_resident_reference`, the PyTorch chain of sorts, binary searches and gathers it
replaces), so both leave the same residency table and pool rows; the kernel is checked against it under
TRITON_INTERPRET=1 on CPU tensors
(tests/unit/engine/test_residency.py) and on CUDA from pinned memory (tests/gpu/test_specache_cuda.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .pair_copy import copy_pairs

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

INDEX_BLOCK = 1024  # positions or slots per iteration of the index passes (a 32k context's top-k in two)
COPY_BLOCK = 64  # pairs per iteration of the copy pass ([COPY_BLOCK, head_dim] keys and values in flight)


@dataclass
class ResidencyScratch:
    """Device scratch of one caller of `make_resident` (a request's step or its prefetch, engine/specache.py ->
    this kernel): `marks` [kv_heads, capacity] int8, zero between calls (the kernel clears what it marks);
    `free` [kv_heads, top_k] int32, the free slots' list; `plan` [kv_heads, top_k] int32, each wanted pair's
    slot (-1: a hit). Two callers that may run at once (two streams) each need their own."""

    marks: torch.Tensor
    free: torch.Tensor
    plan: torch.Tensor

    @classmethod
    def empty(cls, kv_heads: int, capacity: int, top_k: int, device: torch.device) -> "ResidencyScratch":
        lists = (torch.zeros((kv_heads, max(top_k, 1)), dtype=torch.int32, device=device) for _ in range(2))
        return cls(torch.zeros((kv_heads, capacity), dtype=torch.int8, device=device), *lists)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.marks, self.free, self.plan))


def _check(wanted: torch.Tensor, resident: torch.Tensor, targets: torch.Tensor, host_keys: torch.Tensor,
           pool_keys: torch.Tensor) -> None:
    kv_heads, top_k = resident.shape
    if wanted.dim() != 2 or wanted.shape[0] != kv_heads or wanted.shape[1] > top_k or \
            targets.shape != (top_k,) or host_keys.shape[0] != kv_heads or pool_keys.shape[0] != kv_heads:
        raise ValueError(f"make_resident needs wanted [kv_heads, m <= top_k], resident [kv_heads, top_k], targets "
                         f"[top_k] and KV [kv_heads, ..., head_dim], got {tuple(wanted.shape)}, "
                         f"{tuple(resident.shape)}, {tuple(targets.shape)}, {tuple(host_keys.shape)}, "
                         f"{tuple(pool_keys.shape)}")


def make_resident_reference(wanted: torch.Tensor, resident: torch.Tensor, targets: torch.Tensor,
                            host_keys: torch.Tensor, host_values: torch.Tensor, pool_keys: torch.Tensor,
                            pool_values: torch.Tensor, counts: torch.Tensor) -> None:
    """As `make_resident`, in PyTorch: sorts and binary searches for the hits and the kept slots, stable
    argsorts for the misses (in `wanted` order) and the free slots (lowest first), two pair copies of the
    misses (kernels/pair_copy.py) and a scatter into the table. The CPU path, and the kernel's reference."""
    _check(wanted, resident, targets, host_keys, pool_keys)
    top_k, m = resident.shape[1], wanted.shape[1]
    held = resident.sort(dim=1).values
    hit = held.gather(1, torch.searchsorted(held, wanted).clamp(max=top_k - 1)) == wanted
    wanted_sorted = wanted.sort(dim=1).values
    kept = wanted_sorted.gather(1, torch.searchsorted(wanted_sorted, resident).clamp(max=m - 1)) == resident
    misses = (~hit).sum(dim=1, keepdim=True)
    missed = wanted.gather(1, torch.argsort(hit.to(torch.int8), dim=1, stable=True))  # misses first
    free = torch.argsort(kept.to(torch.int8), dim=1, stable=True)[:, :m]  # slots not wanted first
    take = torch.arange(m, device=wanted.device)[None] < misses
    copy_pairs(host_keys, missed, pool_keys, targets[free], take)
    copy_pairs(host_values, missed, pool_values, targets[free], take)
    resident.scatter_(1, free, torch.where(take, missed, resident.gather(1, free)))
    counts += torch.stack((hit.sum(), take.sum()))


if triton is not None:

    @triton.jit
    def _resident_kernel(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts, marks,
                         free, plan, m, top_k, wanted_row, resident_row, hk_head, hk_pos, hv_head, hv_pos, pk_head,
                         pk_slot, pv_head, pv_slot, marks_row, free_row, plan_row, INDEX_BLOCK: tl.constexpr,
                         COPY_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        head = tl.program_id(0).to(tl.int64)
        wanted_base = wanted + head * wanted_row
        resident_base = resident + head * resident_row
        mark_base = marks + head * marks_row
        free_base = free + head * free_row
        plan_base = plan + head * plan_row
        i = tl.arange(0, INDEX_BLOCK)
        # 1. mark every wanted position 1
        for start in range(0, m, INDEX_BLOCK):
            inside = start + i < m
            position = tl.load(wanted_base + start + i, mask=inside, other=0)
            tl.store(mark_base + position, tl.full((INDEX_BLOCK,), 1, tl.int8), mask=inside)
        tl.debug_barrier()
        # 2. a slot holding a wanted position keeps it: that position is a hit, marked 2
        hits = tl.zeros((INDEX_BLOCK,), tl.int32)
        for start in range(0, top_k, INDEX_BLOCK):
            inside = start + i < top_k
            position = tl.load(resident_base + start + i, mask=inside, other=-1)
            held = position >= 0
            mark = tl.load(mark_base + position, mask=held, other=0, cache_modifier=".cg")
            kept = held & (mark == 1)
            tl.store(mark_base + position, tl.full((INDEX_BLOCK,), 2, tl.int8), mask=kept)
            hits += kept.to(tl.int32)
        tl.debug_barrier()
        # 3. the free slots (holding no wanted position), lowest first
        taken = 0
        for start in range(0, top_k, INDEX_BLOCK):
            inside = start + i < top_k
            position = tl.load(resident_base + start + i, mask=inside, other=-1)
            held = position >= 0
            mark = tl.load(mark_base + position, mask=held, other=0, cache_modifier=".cg")
            is_free = inside & (mark != 2)
            rank = taken + tl.cumsum(is_free.to(tl.int32), axis=0) - 1
            tl.store(free_base + rank, start + i, mask=is_free)
            taken += tl.sum(is_free.to(tl.int32), axis=0)
        tl.debug_barrier()
        # 4. the i-th miss (in wanted order) gets the i-th free slot: the plan (-1 for a hit), the table, the marks
        copied = 0
        for start in range(0, m, INDEX_BLOCK):
            inside = start + i < m
            position = tl.load(wanted_base + start + i, mask=inside, other=0)
            mark = tl.load(mark_base + position, mask=inside, other=0, cache_modifier=".cg")
            miss = inside & (mark == 1)
            rank = copied + tl.cumsum(miss.to(tl.int32), axis=0) - 1
            slot = tl.load(free_base + rank, mask=miss, other=0, cache_modifier=".cg")
            tl.store(plan_base + start + i, tl.where(miss, slot, -1), mask=inside)
            tl.store(resident_base + slot, position, mask=miss)
            tl.store(mark_base + position, tl.zeros((INDEX_BLOCK,), tl.int8), mask=inside)
            copied += tl.sum(miss.to(tl.int32), axis=0)
        tl.atomic_add(counts, tl.sum(hits, axis=0).to(tl.int64))
        tl.atomic_add(counts + 1, copied.to(tl.int64))
        tl.debug_barrier()
        # 5. the misses' keys and values from the host into their slots' pool rows, COPY_BLOCK rows at a time
        r = tl.arange(0, COPY_BLOCK)
        d = tl.arange(0, HEAD_DIM)
        for start in range(0, m, COPY_BLOCK):
            inside = start + r < m
            slot = tl.load(plan_base + start + r, mask=inside, other=-1, cache_modifier=".cg")
            miss = slot >= 0
            position = tl.load(wanted_base + start + r, mask=miss, other=0)
            target = tl.load(targets + slot, mask=miss, other=0)
            row = miss[:, None] & (d[None, :] < HEAD_DIM)
            key = tl.load(host_keys + head * hk_head + position[:, None] * hk_pos + d[None, :], mask=row)
            tl.store(pool_keys + head * pk_head + target[:, None] * pk_slot + d[None, :],
                     key.to(pool_keys.dtype.element_ty), mask=row)
            value = tl.load(host_values + head * hv_head + position[:, None] * hv_pos + d[None, :], mask=row)
            tl.store(pool_values + head * pv_head + target[:, None] * pv_slot + d[None, :],
                     value.to(pool_values.dtype.element_ty), mask=row)


def _kernel_applies(wanted: torch.Tensor, resident: torch.Tensor, targets: torch.Tensor, host: torch.Tensor,
                    pool: torch.Tensor, scratch: ResidencyScratch | None) -> bool:
    head_dim = host.shape[2]
    if triton is None or scratch is None or head_dim & (head_dim - 1) or host.stride(2) != 1 or \
            pool.stride(2) != 1 or wanted.stride(1) != 1 or resident.stride(1) != 1 or targets.stride(0) != 1:
        return False
    device = (wanted, resident, targets, pool, scratch.marks, scratch.free, scratch.plan)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return not any(t.is_cuda for t in (*device, host))
    return all(t.is_cuda for t in device) and (host.is_cuda or host.is_pinned())


def make_resident(wanted: torch.Tensor, resident: torch.Tensor, targets: torch.Tensor, host_keys: torch.Tensor,
                  host_values: torch.Tensor, pool_keys: torch.Tensor, pool_values: torch.Tensor,
                  counts: torch.Tensor, scratch: ResidencyScratch | None = None) -> None:
    """Make the `wanted` pairs resident (the module's docstring gives the layout): after the call `resident`
    holds every wanted position, the slots it names hold their host pairs in the pool, and `counts` has grown
    by (hits, pairs copied). One Triton launch of kv_heads programs on CUDA (asynchronous, on the current
    stream; the host tier in pinned memory; `scratch` the caller's, its marks zero, left zero), else the
    reference. ValueError for mismatched shapes."""
    _check(wanted, resident, targets, host_keys, pool_keys)
    if not _kernel_applies(wanted, resident, targets, host_keys, pool_keys, scratch) or \
            host_values.stride() != host_keys.stride() or pool_values.stride() != pool_keys.stride():
        make_resident_reference(wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts)
        return
    kv_heads, m = wanted.shape
    if kv_heads and m:
        _resident_kernel[(kv_heads,)](
            wanted, resident, targets, host_keys, host_values, pool_keys, pool_values, counts, scratch.marks,
            scratch.free, scratch.plan, m, resident.shape[1], wanted.stride(0), resident.stride(0),
            host_keys.stride(0), host_keys.stride(1), host_values.stride(0), host_values.stride(1),
            pool_keys.stride(0), pool_keys.stride(1), pool_values.stride(0), pool_values.stride(1),
            scratch.marks.stride(0), scratch.free.stride(0), scratch.plan.stride(0), INDEX_BLOCK=INDEX_BLOCK,
            COPY_BLOCK=COPY_BLOCK, HEAD_DIM=host_keys.shape[2], num_warps=8)
