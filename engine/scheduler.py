"""The local engine's scheduling policy: which requests take the next forward pass.

Plain Python (no torch, no model, no threads), tested on its own: the engine (engine.py) calls it under its
lock and runs the forward pass it returns. Up to `max_running` requests run at once; up to `max_waiting` more
wait in FIFO order for a slot. Two policies, by what the runner can do:

- batched (`schedule`, runners with a batched decode, engine/decode.py; the scheduler then holds the KV pool's
  BlockAllocator): a waiting request is admitted when a slot is free and the pool has blocks for its whole
  budget (prompt plus its most new tokens: it never runs out mid-decode), and its prefill is the next step;
  otherwise the step is one decode token for every running request (continuous batching: requests join and
  leave between steps). Prefills go first, as vLLM's and SGLang's schedulers order them without chunked
  prefill: a new request's first token waits for at most the prefills ahead of it, never for a generation.
- one request at a time (`next`, runners without one, e.g. transformers' for other architectures): stepped
  round-robin one forward pass (a prefill or one decode token) at a time, so a long generation delays but
  never starves a short one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .errors import QueueFullError
from .kv_pool import BlockAllocator


class PagedRequest(Protocol):
    """What the batched policy reads of a request (the engine's GenerationHandle)."""

    request_id: int

    @property
    def kv_tokens(self) -> int:
        """The most tokens of KV the request can hold: its prompt plus its most new tokens."""
        ...


R = TypeVar("R")  # a request: the engine's GenerationHandle; anything comparable by identity here


@dataclass
class ScheduledStep(Generic[R]):
    """One step of the batched policy, from the scheduler to the engine: a request to prefill (just admitted,
    its KV blocks reserved), or else the requests to decode one token each (every running request)."""

    prefill: R | None = None
    decode: list[R] = field(default_factory=list)


class Scheduler(Generic[R]):
    def __init__(self, max_running: int, max_waiting: int, allocator: BlockAllocator | None = None) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.allocator = allocator  # the batched policy's KV blocks
        self.waiting: deque[R] = deque()
        self.running: deque[R] = deque()

    def add(self, request: R) -> None:
        """Queues a request; QueueFullError when every slot is running and the waiting queue is full."""
        if len(self.running) >= self.max_running and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(
                f"the local engine is busy: {len(self.running)} requests running and {len(self.waiting)} waiting")
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def next(self) -> R:
        """One request at a time: admit waiting requests into free slots, then rotate: the front request steps
        next. Only when has_work()."""
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())
        request = self.running.popleft()
        self.running.append(request)
        return request

    def schedule(self) -> ScheduledStep[R]:
        """The batched policy's next step (needs the allocator; requests are PagedRequests): the front waiting
        request's prefill when it fits, else a decode step of every running request. Only when has_work();
        the step is empty only when nothing runs and the front request cannot fit an empty pool."""
        if self.allocator is None:
            raise RuntimeError("the batched policy needs the KV pool's allocator")
        if self.waiting and len(self.running) < self.max_running:
            front: PagedRequest = self.waiting[0]  # type: ignore[assignment]
            if self.allocator.fits(front.kv_tokens):
                self.allocator.allocate(front.request_id, front.kv_tokens)
                self.running.append(self.waiting.popleft())
                return ScheduledStep(prefill=self.running[-1])
        return ScheduledStep(decode=list(self.running))

    def drop(self, request: R) -> None:
        """Removes a finished or cancelled request from wherever it is, freeing its KV blocks."""
        for queue in (self.running, self.waiting):
            if request in queue:
                queue.remove(request)
        if self.allocator is not None:
            self.allocator.free(request.request_id)  # type: ignore[attr-defined]
