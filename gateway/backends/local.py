"""Chat on blendgate's own engine: chat template, tokenisation, sampling settings, text streaming."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator

from cachetools import LRUCache

from ...chunkcache.adaptation import FetchPolicy, decode_rate
from ...chunkcache.codec import Codec
from ...chunkcache.fallback import PrefillCosts
from ...chunkcache.keys import token_digest
from ...chunkcache.kv_store import ChunkCacheStore
from ...chunkcache.redis_tier import RedisTier
from ...chunkcache.runner import BlendingRunner
from ...chunkcache.tiers import DiskTier, MemoryTier, chunk_tensor_bytes
from ...engine.detokenizer import IncrementalDetokenizer, StopMatcher
from ...engine.engine import LocalEngine
from ...engine.errors import EngineError, PromptTooLongError, QueueFullError
from ...engine.llama import SUPPORTED_MODEL_TYPES
from ...engine.prefill_report import PrefillReport
from ...engine.prompt import Prompt
from ...engine.runner import make_runner
from ...engine.sampling import SamplingParams
from ...engine.weights import LoadedModel, WeightsError, load_model
from ...retriever.defaults import CHUNK_TOKENS
from ..config import ChunkCacheSettings, LocalModelConfig
from ..errors import GatewayError
from ..schemas import ChatCompletionRequest
from .base import ChatBackend, ChatChunk, RequestContext, Usage, loaded_or_503
from .chat_prompt import chat_prompt, check_text_chat, context_length_error, sampling_params
from .request import BackendRequest

log = logging.getLogger("blendgate.gateway")

MAX_CHUNK_ORIGINS = 100_000

@dataclass(frozen=True)
class ChunkOrigin:
    """Which document chunk a chunk-cache entry holds, for operators (the admin API's chunk-cache view):
    `collection` (None for inline documents; "(system prompt)" for the system prompt's own KV), the chunk's
    `id` and `source`."""

    collection: str | None
    id: str | None = None
    source: str | None = None


class LocalBackend(ChatBackend):
    kind = "local"

    def __init__(self, config: LocalModelConfig, *, cache_dir: Path, max_running: int, max_waiting: int,
                 chunk_cache: ChunkCacheSettings | None = None, chunk_tokens: int = CHUNK_TOKENS) -> None:
        """`chunk_tokens`: the retriever's chunk size, which the CPU tier's pinned memory is reserved for."""
        self.config = config
        self.chunk_tokens = chunk_tokens
        self.cache_dir = cache_dir
        self.chunk_cache = chunk_cache or ChunkCacheSettings()
        self.store: ChunkCacheStore | None = None
        self.prefill_costs: PrefillCosts | None = None  # the blend-or-full-prefill rule's, once the model is up
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.model: LoadedModel | None = None
        self.engine: LocalEngine | None = None
        self._load_task: asyncio.Task | None = None
        self._error: str | None = None
        # Which document chunk each chunk-cache entry holds (by the digest of its tokens), for operators:
        # the store's keys are token digests and know nothing of collections.
        self.chunk_origins: LRUCache[str, ChunkOrigin] = LRUCache(MAX_CHUNK_ORIGINS)

    async def start(self) -> None:
        self._load_task = asyncio.create_task(self._load(), name=f"load {self.config.name}")

    async def _load(self) -> None:
        try:
            self.model = await asyncio.to_thread(
                load_model, self.config.path, dtype=self.config.dtype, device=self.config.device,
                cache_dir=self.cache_dir, max_context_tokens=self.config.max_context_tokens)
        except (WeightsError, OSError, ValueError, RuntimeError) as exc:
            self._error = str(exc)
            log.error("model %s failed to load: %s", self.config.name, exc)
            return
        try:  # the batched decode's KV pool is allocated here: too small a pool, or no memory for it, fails
            self.engine = LocalEngine(
                self._runner(self.model), max_context_tokens=self.model.max_context_tokens,
                stop_token_ids=self.model.eos_token_ids, max_running=self.max_running,
                max_waiting=self.max_waiting, kv_pool_tokens=self.config.kv_pool_tokens,
                specache=self.config.specache)
        except (ValueError, RuntimeError) as exc:
            self._error = str(exc)
            log.error("model %s failed to start: %s", self.config.name, exc)
            return
        log.info("model %s is ready", self.config.name)

    def _runner(self, model: LoadedModel):
        settings = self.chunk_cache
        if not settings.enabled or model.model.config.model_type not in SUPPORTED_MODEL_TYPES:
            return make_runner(model)
        tiers = []
        if model.device.type == "cuda":
            tiers.append(MemoryTier("gpu", settings.gpu_bytes, model.device))
        cpu = MemoryTier("cpu", settings.cpu_bytes, "cpu")
        tiers.append(cpu)
        disk_dir = settings.disk_dir or self.cache_dir / "chunk-kv"
        codec = Codec(settings.codec.name, settings.codec.level)  # the disk and shared tiers' entries
        tiers.append(DiskTier("disk", settings.disk_bytes, disk_dir, codec, device=model.device))
        shared = settings.redis
        # No connection is made here: the first lookup connects (from the engine's thread).
        shared_tier = RedisTier(shared.url, shared.budget_bytes, key_prefix=shared.key_prefix,
                                timeout_s=shared.timeout_s, write_queue_bytes=shared.write_queue_bytes,
                                retry_s=shared.retry_s, codec=codec, device=model.device) if shared.url else None
        # Bandwidth adaptation: the tier's measured link rate, the codec's decode rate, the prefill's costs (set by
        # the calibration below).
        adaptation = FetchPolicy(
            decode_rate(settings.codec.name, settings.codec.level, on_gpu=shared_tier.decode_device.type == "cuda"),
            link=shared_tier.link) if shared_tier is not None and shared.adapt else None
        self.store = ChunkCacheStore(tiers, eviction=settings.eviction, shared=shared_tier, adaptation=adaptation)
        runner = BlendingRunner(model, self.store, prefix_entries=settings.prefix_entries,
                                chunk_prefix_entries=settings.chunk_prefix_entries,
                                chunk_prefix=settings.chunk_prefix, rule=settings.selection.rule())
        # On a GPU machine the CPU tier's budget is pinned before serving (chunkcache/tiers.py: MemoryTier.reserve).
        cpu.reserve(chunk_tensor_bytes(runner.blender.model, self.chunk_tokens))
        # The blend-or-full-prefill rule's and the fetch policy's costs, measured on this device where needed.
        runner.costs = runner.blender.calibrate(settings.pass_cost_tokens, settings.placement_cost_tokens)
        self.prefill_costs = runner.costs
        return runner

    async def wait_ready(self) -> None:
        if self._load_task is not None:
            await self._load_task

    async def close(self) -> None:
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        if self.store is not None:  # the shared tier's queued writes, then its connections
            await asyncio.to_thread(self.store.close)

    def status(self) -> dict[str, Any]:
        if self.engine is not None:
            status = {"state": "ready", **self.engine.stats()}
            if self.store is not None:
                status["chunk_cache"] = {**self.store.report(), "prefill_costs": self.prefill_costs_view()}
            return status
        if self._error is not None:
            return {"state": "failed", "error": self._error}
        return {"state": "loading"}

    def prefill_costs_view(self) -> dict[str, Any] | None:
        """The blend-or-full-prefill rule's costs in tokens (pass_tokens, placement_tokens) and whether the pass
        cost was configured or "auto" (measured at start-up on a GPU, the CPU default otherwise); None before
        the model is up."""
        if self.prefill_costs is None:
            return None
        return {**asdict(self.prefill_costs),
                "pass_cost": "auto" if self.chunk_cache.pass_cost_tokens == "auto" else "configured"}

    # -- request path ---------------------------------------------------------------------------
    def _prompt(self, request: BackendRequest) -> Prompt:
        return chat_prompt(self.model.tokenizer, request, mode=self.chunk_cache.mode,  # type: ignore[union-attr]
                           recompute_ratio=self.chunk_cache.recompute_ratio,
                           fidelity_target=self.chunk_cache.fidelity_target,
                           context_documents=self.chunk_cache.context_documents,
                           chunk_context=self.chunk_cache.chunk_context)

    def _remember_origins(self, request: BackendRequest, prompt: Prompt) -> None:
        if self.store is None or request.rag_prompt is None:
            return
        first = prompt.segments[0]
        if not first.is_chunk:  # the system prompt's own KV, which blending reuses, is stored too
            self.chunk_origins[token_digest(list(first.token_ids))] = ChunkOrigin("(system prompt)")
        chunk_segments = [s for s in prompt.segments if s.is_chunk]
        for chunk, segment in zip(request.rag_prompt.chunks, chunk_segments):
            digest = token_digest(list(segment.token_ids))
            self.chunk_origins[digest] = ChunkOrigin(request.collection, chunk.id, chunk.source)

    def _sampling(self, request: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        context = self.model.max_context_tokens  # type: ignore[union-attr]
        return sampling_params(request, self.config.sampling_defaults,
                               request.completion_limit() or max(1, context - prompt_tokens))

    @staticmethod
    def _chunk_report(request: BackendRequest, report: PrefillReport | None) -> PrefillReport | None:
        """The runner's prefill report, with each chunk's hit named by the chunk's id."""
        if report is None or report.hits is None or request.rag_prompt is None:
            return report
        return replace(report, chunk_ids=[chunk.id for chunk in request.rag_prompt.chunks])

    def check(self, request: ChatCompletionRequest) -> None:
        check_text_chat(request, "local models")

    async def stream(self, request: BackendRequest, ctx: RequestContext) -> AsyncIterator[ChatChunk]:
        engine = loaded_or_503(self.engine, self.config.name, self._error, "loading")
        # Template rendering and tokenising take seconds for a body of megabytes: off the event loop.
        prompt = await asyncio.to_thread(self._prompt, request)
        self._remember_origins(request, prompt)
        chat = request.chat
        try:
            handle = engine.submit(prompt, self._sampling(chat, len(prompt)))
        except PromptTooLongError as exc:
            raise context_length_error(exc.max_context_tokens, exc.prompt_tokens) from exc
        except QueueFullError as exc:
            raise GatewayError(503, str(exc), code="engine_overloaded") from exc
        ctx.backend = self.kind
        ctx.usage = Usage(prompt_tokens=len(prompt))
        detokenizer = IncrementalDetokenizer(self.model.tokenizer)  # type: ignore[union-attr]
        stops = StopMatcher(chat.stop_sequences)
        try:
            yield ChatChunk(delta={"role": "assistant", "content": ""})
            finish_reason = None
            async for event in handle:
                if ctx.queue_s is None and handle.started_at is not None:
                    ctx.queue_s = handle.started_at - handle.submitted_at
                    ctx.chunk_cache = self._chunk_report(request, handle.prefill_report)
                ctx.usage.completion_tokens = handle.generated
                text = stops.feed(detokenizer.add(event.token_id)) if event.is_text else ""
                if stops.stopped:
                    finish_reason = "stop"
                elif event.finish_reason is not None:
                    finish_reason = event.finish_reason
                    text += stops.flush()
                if text:
                    yield ChatChunk(delta={"content": text})
                if finish_reason is not None:
                    break
            yield ChatChunk(delta={}, finish_reason=finish_reason)
        except EngineError as exc:
            raise GatewayError(503, str(exc), code="engine_error") from exc
        finally:
            handle.cancel()  # stops generation when the client went away or a stop sequence ended it
