"""The local engine's scheduling policy: which request takes the next forward pass.

Plain Python (no torch, no model, no threads), tested on its own: the engine (engine.py) calls it under its
lock and runs the forward pass of the request it returns. Up to `max_running` requests run at once, stepped
round-robin one forward pass (a prefill or one decode token) at a time, so a long generation delays but never
starves a short one; up to `max_waiting` more wait in FIFO order for a slot.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from .errors import QueueFullError

R = TypeVar("R")  # a request: the engine's GenerationHandle; anything comparable by identity here


class Scheduler(Generic[R]):
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
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
        """Admit waiting requests into free slots, then rotate: the front request steps next. Only when
        has_work()."""
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())
        request = self.running.popleft()
        self.running.append(request)
        return request

    def drop(self, request: R) -> None:
        """Removes a finished or cancelled request from wherever it is."""
        for queue in (self.running, self.waiting):
            if request in queue:
                queue.remove(request)
