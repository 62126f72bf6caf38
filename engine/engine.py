"""The local engine: token ids in, generated tokens out, as they are produced.

One worker thread owns the model and runs one forward pass at a time, so no two forward passes touch the model
together; the asyncio side only waits on per-request queues, so the event loop never blocks. What a forward
pass computes is the scheduler's choice (scheduler.py):

- with a runner that decodes in batches (LlamaRunner and its blending subclass: `BatchRunner`), the running
  requests' KV lives in one paged pool (kv_pool.py: blocks reserved at admission; paged_kv.py: the tensors),
  a step is either one admitted request's prefill (whose KV is then copied into its blocks) or one decode
  token for every running request in one forward pass (decode.py, CUDA graphs on CUDA), and each request's
  token is sampled from its row of the logits;
- otherwise (transformers' runner, for other architectures) one request's prefill or decode token at a time,
  round-robin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, runtime_checkable

import torch

from .batch import DecodeBatch
from .decode import BatchDecoder
from .errors import EngineError, PromptTooLongError
from .kv_pool import BlockAllocation, BlockAllocator, blocks_for
from .prefill_report import PrefillReport
from .prompt import Prompt
from .runner import KVState
from .sampling import Sampler, SamplingParams, sample_batch
from .scheduler import Scheduler
from .specache import SpeCacheDecoder
from .specache_policy import SpeCacheSettings

log = logging.getLogger("blendgate.engine")


class Runner(Protocol):
    device: torch.device

    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState]: ...

    def decode(self, token_id: int, state: KVState) -> torch.Tensor: ...

    def warm_step(self, busy: bool) -> bool:
        """One piece of background work (chunk-caches a full-prefill fallback left uncached), run between the
        engine's steps (`busy`: requests are being served, so it may be paced) and while it is idle; whether
        more is left."""
        ...


@runtime_checkable
class BatchRunner(Runner, Protocol):
    """A runner whose prefills end in a KVCache that a BatchDecoder over a paged pool continues."""

    @property
    def kv_token_bytes(self) -> int:
        """Bytes of KV one token takes in the pool (every layer's key and value)."""
        ...

    def batch_decoder(self, num_blocks: int, rows: int, max_context_tokens: int) -> BatchDecoder: ...


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
    # Worker-thread state. With a batched runner, kv.cache is the request's BlockAllocation once prefilled.
    kv: KVState | None = None
    sampler: Sampler | None = None
    generated: int = 0
    last_token: int = -1
    # What the runner reports of the prefill (chunk-cache hits, recompute ratio), once it has run.
    prefill_report: PrefillReport | None = None
    # A SpeCache request's GPU budget (KV pairs it reserves in the pool), set at submit; None: full KV.
    specache_budget: int | None = None

    @property
    def kv_tokens(self) -> int:
        """The most tokens of KV the request holds in the pool (scheduler.PagedRequest): prompt and new tokens,
        or its SpeCache budget (its full KV then lives in host memory)."""
        return self.specache_budget or len(self.prompt) + self.max_new_tokens

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


# The batched decode's pool takes at most this share of the GPU memory free at start-up, by default.
KV_POOL_GPU_SHARE = 0.5


class LocalEngine:
    """`kv_pool_tokens`: tokens of KV the batched decode's pool holds; at least max_context_tokens. By default
    max_running requests of max_context_tokens each (a slot never waits for blocks), and on CUDA at most what
    KV_POOL_GPU_SHARE of the free GPU memory holds (requests then wait for blocks: each reserves its prompt and
    its most new tokens).

    `specache`: SpeCache (engine/specache.py) for the prompts it applies to (batched runners only): their full
    KV in host memory, a GPU budget of it in the pool; they decode in their own (eager) step beside the
    others'."""

    def __init__(self, runner: Runner, *, max_context_tokens: int, stop_token_ids: frozenset[int],
                 max_running: int = 4, max_waiting: int = 64, kv_pool_tokens: int | None = None,
                 specache: SpeCacheSettings | None = None) -> None:
        self.runner = runner
        self.max_context_tokens = max_context_tokens
        self.stop_token_ids = stop_token_ids
        self._decoder: BatchDecoder | None = None
        allocator = None
        if isinstance(runner, BatchRunner):
            pool_tokens = kv_pool_tokens or self._default_pool_tokens(runner, max_running * max_context_tokens)
            if pool_tokens < max_context_tokens:
                raise ValueError(f"a KV pool of {pool_tokens} tokens cannot hold one request of the "
                                 f"{max_context_tokens}-token context: give the model a shorter context "
                                 f"(max_context_tokens) or free GPU memory")
            allocator = BlockAllocator(blocks_for(pool_tokens) + 1, max_running)  # + the scratch block
            self._decoder = runner.batch_decoder(allocator.num_blocks, max_running, max_context_tokens)
        self._specache = None
        if self._decoder is not None and specache is not None and specache.enabled:
            self._specache = SpeCacheDecoder(self._decoder.model, self._decoder.pool, specache)
        self._scheduler: Scheduler[GenerationHandle] = Scheduler(max_running, max_waiting, allocator)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="blendgate-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def _default_pool_tokens(runner: BatchRunner, wanted: int) -> int:
        if runner.device.type != "cuda":
            return wanted
        free, _ = torch.cuda.mem_get_info(runner.device)
        return min(wanted, int(free * KV_POOL_GPU_SHARE) // runner.kv_token_bytes)

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
        if self._specache is not None and self._specache.settings.applies(len(prompt)):
            handle.specache_budget = self._specache.settings.budget(len(prompt)).tokens
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
            if self._decoder is not None:
                try:
                    self._decoder.capture_all()
                except Exception:  # serving eagerly beats not serving
                    log.exception("capturing the decode step's CUDA graphs failed; decoding eagerly")
                    self._decoder.graphs = False
            warming = True  # whether the runner may have background work left
            while True:
                with self._cond:
                    while not self._stopping and not self._scheduler.has_work() and not warming:
                        self._cond.wait()
                    idle = not self._scheduler.has_work()
                    if self._stopping:
                        for request in [*self._scheduler.running, *self._scheduler.waiting]:
                            request._emit(_SHUTDOWN)
                        return
                    if idle:  # only the runner's background work
                        one, allocation, decode = None, None, []
                    elif self._decoder is None:  # one request's forward pass, round-robin
                        one, allocation, decode = self._scheduler.next(), None, []
                    else:
                        step = self._scheduler.schedule()
                        one, decode = step.prefill, step.decode
                        allocation = None if one is None else self._scheduler.allocator.get(one.request_id)
                if not idle:
                    if one is not None:
                        self._step_one(one, allocation)
                    else:
                        self._decode_batch(decode)
                # Between steps (paced) or idle: chunks a fallback left uncached (one pass for a few, off
                # requests' first tokens).
                warming = self._warm_step(busy=not idle)

    def _warm_step(self, busy: bool) -> bool:
        """The runner's background work, one piece; whether more is left. A failure is logged (and ends this
        round of it), never a request's."""
        try:
            return bool(self.runner.warm_step(busy))
        except Exception:
            log.exception("background chunk-cache warming failed")
            return False

    def _step_one(self, request: GenerationHandle, allocation: BlockAllocation | None) -> None:
        """A request's prefill (its KV then copied into its blocks, where the scheduler reserved them), or
        (without a batched decoder) one decode token of it."""
        if request.cancelled:
            self._finish(request)
            return
        try:
            if request.kv is None:
                request.started_at = time.perf_counter()
                request.sampler = Sampler(request.params, self.runner.device)
                logits, request.kv = self.runner.prefill(request.prompt)
                request.prefill_report = request.kv.report
                if allocation is not None and request.specache_budget:  # to host memory, a budget on the GPU
                    self._specache.admit(request.request_id, allocation, request.kv.cache, request.max_new_tokens)
                    request.kv.cache = allocation
                elif allocation is not None:  # the prefill's KV into the request's blocks of the pool
                    self._decoder.pool.store(allocation, request.kv.cache)
                    request.kv.cache = allocation
            else:
                logits = self.runner.decode(request.last_token, request.kv)
            self._emit_token(request, request.sampler.sample(logits))
        except Exception as exc:  # one request's failure must not stop the engine
            self._fail(request, exc)

    def _decode_batch(self, requests: list[GenerationHandle]) -> None:
        """One token for each running request: one forward pass, and one more for SpeCache's requests."""
        live = []
        for request in requests:
            if request.cancelled:
                self._finish(request)
            else:
                live.append(request)
        offloaded = [request for request in live if request.specache_budget]
        live = [request for request in live if not request.specache_budget]
        if offloaded:
            self._decode_with(offloaded, lambda: self._specache.decode(self._specache.batch(
                [request.request_id for request in offloaded], [request.last_token for request in offloaded])))
        if live:
            self._decode_with(live, lambda: self._decoder.decode(self._batch(live)))

    def _decode_with(self, requests: list[GenerationHandle], logits: Callable[[], torch.Tensor]) -> None:
        """One token for each of `requests` from one decode step (`logits`: [len(requests), vocab]); a failed
        step fails them all, and the engine goes on."""
        try:
            tokens = sample_batch([request.sampler for request in requests], logits())
        except Exception as exc:
            for request in requests:
                self._fail(request, exc)
            return
        for request, token in zip(requests, tokens):
            request.kv.length += 1
            self._emit_token(request, token)

    def _batch(self, requests: list[GenerationHandle]) -> DecodeBatch:
        allocations: list[BlockAllocation] = [request.kv.cache for request in requests]
        positions = [request.kv.length for request in requests]
        return DecodeBatch(request_ids=tuple(request.request_id for request in requests),
                           token_ids=tuple(request.last_token for request in requests),
                           positions=tuple(positions),
                           slots=tuple(a.slot(p) for a, p in zip(allocations, positions)),
                           rows=tuple(a.row for a in allocations))

    def _emit_token(self, request: GenerationHandle, token: int) -> None:
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
        if finish is not None:  # its slot and KV blocks are free by the time the consumer sees the last token
            self._finish(request)
        request._emit(TokenEvent(token, finish, is_text=not is_stop))

    def _fail(self, request: GenerationHandle, exc: Exception) -> None:
        log.error("request %d failed", request.request_id, exc_info=exc)
        request._emit(exc)
        self._finish(request)

    def _finish(self, request: GenerationHandle) -> None:
        request.finished_at = time.perf_counter()
        request.kv = None  # frees the KV cache now, not when the consumer lets go of the handle
        if self._specache is not None:
            self._specache.release(request.request_id)
        with self._cond:
            self._scheduler.drop(request)  # and its blocks of the pool
