"""The local engine: token ids in, generated tokens out, as they are produced.

One worker thread owns the model and runs one forward pass at a time (a prefill or one decode token) for
the request the scheduler (scheduler.py: FIFO admission, round-robin steps) picks, so no two forward passes
touch the model together. The asyncio side only waits on per-request queues, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import torch

from .errors import EngineError, PromptTooLongError
from .prompt import Prompt
from .runner import KVState
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler

log = logging.getLogger("blendgate.engine")


class Runner(Protocol):
    device: torch.device

    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState]: ...

    def decode(self, token_id: int, state: KVState) -> torch.Tensor: ...


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    # Set on the request's last event: "stop" (a stop token was generated) or "length".
    finish_reason: str | None = None
    # False for the stop token itself, which counts as generated but is not part of the answer's text.
    is_text: bool = True


_SHUTDOWN = object()


@dataclass(eq=False)
class GenerationHandle:
    """One submitted request: iterate it for TokenEvents; cancel() frees its slot and KV at once."""

    request_id: int
    prompt: Prompt
    params: SamplingParams
    max_new_tokens: int
    _loop: asyncio.AbstractEventLoop
    _events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # Worker-thread state.
    kv: KVState | None = None
    sampler: Sampler | None = None
    generated: int = 0
    last_token: int = -1
    # What the runner reports of the prefill (chunk-cache hits, recompute ratio), once it has run.
    prefill_report: dict | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is gone (shutdown): nobody is listening any more

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while True:
                item = await self._events.get()
                if item is _SHUTDOWN:
                    raise EngineError("the engine shut down before the request finished")
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.cancel()


class LocalEngine:
    def __init__(self, runner: Runner, *, max_context_tokens: int, stop_token_ids: frozenset[int],
                 max_running: int = 4, max_waiting: int = 64) -> None:
        self.runner = runner
        self.max_context_tokens = max_context_tokens
        self.stop_token_ids = stop_token_ids
        self._scheduler: Scheduler[GenerationHandle] = Scheduler(max_running, max_waiting)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="blendgate-engine", daemon=True)
        self._thread.start()

    # -- asyncio side ---------------------------------------------------------------------------
    def submit(self, prompt: Prompt | list[int], params: SamplingParams) -> GenerationHandle:
        """Queue a request; raises PromptTooLongError or QueueFullError at once, before anything runs."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt.plain(prompt)
        if len(prompt) >= self.max_context_tokens:
            raise PromptTooLongError(len(prompt), self.max_context_tokens)
        handle = GenerationHandle(
            request_id=next(self._ids), prompt=prompt, params=params,
            # Generation also ends where the context does; that finish counts as "length".
            max_new_tokens=min(params.max_new_tokens, self.max_context_tokens - len(prompt)),
            _loop=asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise EngineError("the engine is shutting down")
            self._scheduler.add(handle)
            self._cond.notify()
        return handle

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._scheduler.running), "waiting": len(self._scheduler.waiting)}

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- worker thread --------------------------------------------------------------------------
    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._scheduler.has_work():
                        self._cond.wait()
                    if self._stopping:
                        for request in [*self._scheduler.running, *self._scheduler.waiting]:
                            request._emit(_SHUTDOWN)
                        return
                    request = self._scheduler.next()
                if request.cancelled:
                    self._finish(request)
                    continue
                try:
                    self._step(request)
                except Exception as exc:  # one request's failure must not stop the engine
                    log.exception("request %d failed", request.request_id)
                    request._emit(exc)
                    self._finish(request)

    def _step(self, request: GenerationHandle) -> None:
        if request.kv is None:
            request.started_at = time.perf_counter()
            request.sampler = Sampler(request.params, self.runner.device)
            logits, request.kv = self.runner.prefill(request.prompt)
            request.prefill_report = request.kv.report
        else:
            logits = self.runner.decode(request.last_token, request.kv)
        token = request.sampler.sample(logits)
        request.generated += 1
        request.last_token = token
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        finish = None
        is_stop = token in self.stop_token_ids or token in request.params.stop_token_ids
        if is_stop:
            finish = "stop"
        elif request.generated >= request.max_new_tokens:
            finish = "length"
        request._emit(TokenEvent(token, finish, is_text=not is_stop))
        if finish is not None:
            self._finish(request)

    def _finish(self, request: GenerationHandle) -> None:
        request.finished_at = time.perf_counter()
        request.kv = None  # frees the KV cache now, not when the consumer lets go of the handle
        with self._cond:
            self._scheduler.drop(request)
