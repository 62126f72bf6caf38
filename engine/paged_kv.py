"""The paged KV pool on the model's device: every running request's KV, reachable from one decode kernel.

Layout (per layer, as KVCache's, so the same rope_store kernel writes both): keys and values
[layers, kv_heads, num_blocks * PAGE_SIZE, head_dim], keys rotated to their positions; a request's position p
at slot blocks[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE (kv_pool.py decides who owns which blocks). The
block table [rows + 1, max_blocks] int32 holds each admitted request's blocks in its row; its last row is the
padding row (all scratch block 0), which the padding entries of a CUDA-graph batch read. Prefills (plain,
prefix-cached and blended, which all produce a KVCache) hand their KV over with `store`.
"""

from __future__ import annotations

import torch

from .kv_pool import PAGE_SIZE, SCRATCH_BLOCK, BlockAllocation, KVPoolError
from .llama import KVCache, LlamaFamilyModel


class PagedKVPool:
    def __init__(self, model: LlamaFamilyModel, num_blocks: int, rows: int, max_blocks: int) -> None:
        shape = (model.num_layers, model.kv_heads, num_blocks * PAGE_SIZE, model.head_dim)
        self.keys = torch.empty(shape, dtype=model.dtype, device=model.device)
        self.values = torch.empty(shape, dtype=model.dtype, device=model.device)
        scratch = slice(SCRATCH_BLOCK * PAGE_SIZE, (SCRATCH_BLOCK + 1) * PAGE_SIZE)
        self.keys[:, :, scratch] = 0  # padding rows read it: finite numbers
        self.values[:, :, scratch] = 0
        self.block_tables = torch.full((rows + 1, max_blocks), SCRATCH_BLOCK, dtype=torch.int32, device=model.device)
        self.padding_row = rows
        self.device = model.device

    @property
    def bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def store(self, allocation: BlockAllocation, cache: KVCache) -> None:
        """Copy a prefilled request's KV (slots 0..length-1 of `cache`, slot j holding position j) into its
        blocks and write its block-table row. KVPoolError when the KV is longer than the reservation."""
        length = cache.length
        if length > allocation.capacity:
            raise KVPoolError(f"{length} tokens of KV do not fit the request's {allocation.capacity} reserved slots")
        slots = torch.tensor(allocation.slots(length), dtype=torch.long, device=self.device)
        self.keys[:, :, slots] = cache.keys[:, :, :length]
        self.values[:, :, slots] = cache.values[:, :, :length]
        self.write_table(allocation)

    def write_table(self, allocation: BlockAllocation) -> None:
        """The request's blocks into its block-table row (the rest of the row: the scratch block)."""
        if len(allocation.blocks) > self.block_tables.shape[1]:
            raise KVPoolError(f"{len(allocation.blocks)} blocks are more than a block-table row holds "
                              f"({self.block_tables.shape[1]}: the engine's context)")
        row = self.block_tables[allocation.row]
        row.fill_(SCRATCH_BLOCK)
        row[: len(allocation.blocks)] = torch.tensor(allocation.blocks, dtype=torch.int32, device=self.device)
