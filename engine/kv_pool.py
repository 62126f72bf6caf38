"""Which KV blocks of the shared pool each running request owns: a free-list block allocator in plain Python.

The batched decode (engine/decode.py) keeps every running request's KV in one paged pool
(engine/paged_kv.py): slots grouped into blocks of PAGE_SIZE tokens, a request's KV in the blocks of its block
table, in order (position p at slot blocks[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE), as vLLM's
PagedAttention and SGLang's token-to-KV pool keep it. This module decides ownership only (no torch, no
tensors), so the scheduler (scheduler.py) asks it whether a request fits before admitting it.

A request reserves the blocks of its whole budget (prompt plus its most new tokens) when it is admitted, so a
running request never runs out of blocks mid-decode and nothing is ever preempted; a request that does not fit
waits (BlockAllocator.fits is False) until finished requests free theirs. Block 0 is never handed out: it is
the scratch block that the padding rows of a CUDA-graph batch write to. Each request also gets a row of the
pool's device block table (a request-to-blocks table, SGLang's req_to_token), free rows kept like blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 16  # tokens per block (vLLM's default)
SCRATCH_BLOCK = 0


class KVPoolError(ValueError):
    """A request the pool can never hold, or an allocator call that breaks its invariants."""


@dataclass(frozen=True)
class BlockAllocation:
    """One request's share of the pool, from the allocator (scheduler side) to the paged KV pool and the batched
    decode (model side): its `row` of the device block table and its `blocks` in position order."""

    row: int
    blocks: tuple[int, ...]

    @property
    def capacity(self) -> int:
        """Tokens of KV the blocks hold."""
        return len(self.blocks) * PAGE_SIZE

    def slot(self, position: int) -> int:
        """The pool slot holding the KV of this position; KVPoolError past the reservation."""
        if not 0 <= position < self.capacity:
            raise KVPoolError(f"position {position} is outside the request's {self.capacity} reserved slots")
        return self.blocks[position // PAGE_SIZE] * PAGE_SIZE + position % PAGE_SIZE

    def slots(self, length: int) -> list[int]:
        """The slots of positions 0..length-1."""
        return [self.slot(position) for position in range(length)]


def blocks_for(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


class BlockAllocator:
    """Free lists of blocks (1..num_blocks-1; block 0 is scratch) and block-table rows (0..rows-1), and what
    each request holds, by request id. `fits`, `allocate`, `free`; `free_blocks` for reports and tests."""

    def __init__(self, num_blocks: int, rows: int) -> None:
        if num_blocks < 2 or rows < 1:
            raise KVPoolError(f"a KV pool needs at least 2 blocks and 1 row, not {num_blocks} and {rows}")
        self.num_blocks = num_blocks
        self.rows = rows
        # Popped from the end: the lowest numbers are handed out first.
        self._free_blocks = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))
        self._free_rows = list(range(rows - 1, -1, -1))
        self._held: dict[int, BlockAllocation] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def usable_tokens(self) -> int:
        """The most tokens one request could ever reserve (every block but the scratch one)."""
        return (self.num_blocks - 1) * PAGE_SIZE

    def fits(self, tokens: int) -> bool:
        """Whether a request of this many tokens can be allocated now."""
        return bool(self._free_rows) and blocks_for(tokens) <= len(self._free_blocks)

    def allocate(self, request_id: int, tokens: int) -> BlockAllocation:
        """Reserve blocks for `tokens` tokens (at least one block). KVPoolError when the request holds blocks
        already, or does not fit now (callers ask `fits` first)."""
        if request_id in self._held:
            raise KVPoolError(f"request {request_id} holds KV blocks already")
        if tokens > self.usable_tokens:
            raise KVPoolError(f"a request of {tokens} tokens is larger than the whole KV pool "
                              f"({self.usable_tokens} tokens)")
        if not self.fits(tokens):
            raise KVPoolError(f"the KV pool has {len(self._free_blocks)} free blocks and {len(self._free_rows)} free "
                              f"rows; {blocks_for(tokens)} blocks are needed for {tokens} tokens")
        blocks = tuple(self._free_blocks.pop() for _ in range(max(1, blocks_for(tokens))))
        allocation = self._held[request_id] = BlockAllocation(self._free_rows.pop(), blocks)
        return allocation

    def get(self, request_id: int) -> BlockAllocation | None:
        return self._held.get(request_id)

    def free(self, request_id: int) -> None:
        """Give a request's blocks and row back; nothing when it holds none (never admitted, or freed)."""
        allocation = self._held.pop(request_id, None)
        if allocation is not None:
            self._free_blocks.extend(reversed(allocation.blocks))
            self._free_rows.append(allocation.row)
