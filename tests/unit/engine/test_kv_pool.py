"""The paged KV pool's block allocator (engine/kv_pool.py) and the scheduler's batched policy over it
(engine/scheduler.py: schedule), plain Python: no model, no torch."""

from __future__ import annotations

import random
import subprocess
import sys
from dataclasses import dataclass

import pytest
from blendgate.engine.kv_pool import PAGE_SIZE, SCRATCH_BLOCK, BlockAllocation, BlockAllocator, KVPoolError
from blendgate.engine.scheduler import Scheduler


def test_random_allocations_never_share_a_block_or_row_and_all_come_back() -> None:
    allocator = BlockAllocator(num_blocks=40, rows=6)
    rng = random.Random(0)
    held: dict[int, BlockAllocation] = {}
    for request_id in range(300):
        if held and (rng.random() < 0.4 or len(held) == 6):
            done = rng.choice(sorted(held))
            del held[done]
            allocator.free(done)
            continue
        tokens = rng.randint(1, 12 * PAGE_SIZE)
        if not allocator.fits(tokens):
            with pytest.raises(KVPoolError, match="free blocks"):
                allocator.allocate(request_id, tokens)
            continue
        held[request_id] = allocation = allocator.allocate(request_id, tokens)
        assert allocation.capacity >= tokens > allocation.capacity - PAGE_SIZE
        blocks = [b for a in held.values() for b in a.blocks]
        assert len(blocks) == len(set(blocks)) and SCRATCH_BLOCK not in blocks
        assert len({a.row for a in held.values()}) == len(held)
        assert allocator.free_blocks == 39 - len(blocks)
    for request_id in list(held):
        allocator.free(request_id)
    assert allocator.free_blocks == 39 and allocator.fits(39 * PAGE_SIZE)


def test_slots_follow_the_block_table_and_stop_at_the_reservation() -> None:
    allocation = BlockAllocation(row=0, blocks=(7, 3))
    assert allocation.slots(PAGE_SIZE + 2) == [*range(7 * PAGE_SIZE, 8 * PAGE_SIZE), 3 * PAGE_SIZE, 3 * PAGE_SIZE + 1]
    with pytest.raises(KVPoolError, match="outside the request's 32 reserved slots"):
        allocation.slot(2 * PAGE_SIZE)


def test_requests_the_pool_cannot_hold_are_clear_errors() -> None:
    allocator = BlockAllocator(num_blocks=3, rows=2)
    with pytest.raises(KVPoolError, match="larger than the whole KV pool"):
        allocator.allocate(1, 2 * PAGE_SIZE + 1)
    allocator.allocate(1, 5)
    with pytest.raises(KVPoolError, match="holds KV blocks already"):
        allocator.allocate(1, 5)
    with pytest.raises(KVPoolError, match="at least 2 blocks"):
        BlockAllocator(num_blocks=1, rows=1)


@dataclass(eq=False)
class Request:
    """A stand-in for the engine's GenerationHandle: an id and its budget of KV tokens."""

    request_id: int
    kv_tokens: int


def test_batched_policy_prefills_first_then_decodes_every_running_request() -> None:
    a, b, c = Request(1, 20), Request(2, 20), Request(3, 20)
    scheduler = Scheduler(max_running=2, max_waiting=4, allocator=BlockAllocator(num_blocks=20, rows=2))
    for request in (a, b, c):
        scheduler.add(request)
    assert scheduler.schedule().prefill is a
    assert scheduler.schedule().prefill is b
    step = scheduler.schedule()  # c waits for a slot: both running requests decode together
    assert step.prefill is None and step.decode == [a, b]
    scheduler.drop(a)  # finished: its slot and blocks go to c, which joins the next decode step
    assert scheduler.schedule().prefill is c
    assert scheduler.schedule().decode == [b, c]
    scheduler.drop(b)
    scheduler.drop(c)
    assert not scheduler.has_work() and scheduler.allocator.free_blocks == 19


def test_a_request_waits_for_blocks_while_the_others_decode() -> None:
    big, small = Request(1, 3 * PAGE_SIZE), Request(2, 2 * PAGE_SIZE)
    scheduler = Scheduler(max_running=4, max_waiting=4, allocator=BlockAllocator(num_blocks=5, rows=4))
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.schedule().prefill is big
    for _ in range(3):  # one free block: small waits, in order, while big decodes
        assert scheduler.schedule().decode == [big]
    assert list(scheduler.waiting) == [small]
    scheduler.drop(big)
    assert scheduler.schedule().prefill is small


def test_the_allocator_and_the_scheduler_import_no_torch() -> None:
    code = ("import sys, blendgate.engine.kv_pool, blendgate.engine.scheduler, blendgate.engine.batch; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
