"""The chat endpoint's work: what a chat request becomes at each stage, and the OpenAI responses and SSE
streams it ends as. ChatService.handle runs the stages in this order:

1. ChatCompletionRequest (gateway/schemas.py), validated by FastAPI, with the tenant from auth.ApiKeyAuth;
   its backend (gateway/backends/) is picked by model name and refuses what it cannot take (check()).
2. Semantic-cache lookup: AnswerCache (gateway/answer_cache.py) decides whether the cache applies and makes
   an AnswerCachePlan (key, question embedding); its lookup gives semcache's LookupResult. A hit is replayed as the
   answer (JSON or SSE) and the request ends here.
3. RAG: retrieval_for (gateway/rag.py) decides which collection applies, once, for both the cache key and the
   retrieval; RagPlanner gives a RagResult (the rewritten request, the RagPrompt of rag_template.py, and the
   RagReport of rag_report.py).
4. BackendRequest (gateway/backends/request.py): the chat request, the RAG prompt, the collection and the
   tenant, as the backend receives it.
5. Backend stream: ChatChunks (or a ChatResult) from the backend (backends/base.py), which fills the
   RequestContext (timings, usage, the prefill's PrefillReport of engine/prefill_report.py).
6. Response and cache put: the answer as chat.completion JSON or SSE frames, with RequestContext.report() as
   `blendgate`; the request's series recorded (gateway/metrics/series.py: GatewayMetrics.observe_chat); a
   complete answer stored by the AnswerCachePlan.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any, AsyncIterator, Mapping

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..semcache.audit import HitAuditor
from ..semcache.lookup import LookupResult
from ..semcache.policy import LoadMonitor
from .answer_cache import AnswerCache, AnswerCachePlan
from .backends.base import ChatBackend, ChatChunk, RequestContext, Usage
from .backends.request import BackendRequest
from .config import ModelRagConfig
from .errors import GatewayError
from .hit_audit import HitAudits
from .metrics.series import GatewayMetrics
from .rag import RagPlanner, retrieval_for
from .rag_report import RagReport
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _replay_pieces(content: str, words_per_piece: int = 4) -> list[str]:
    """A cached answer cut into small deltas, so a replayed stream looks like a generated one."""
    words = content.split(" ")
    return [" ".join(words[i:i + words_per_piece]) + (" " if i + words_per_piece < len(words) else "")
            for i in range(0, len(words), words_per_piece)]


class StreamRelease:
    """Ends a streamed request's bookkeeping exactly once: stops the generation behind it and takes it off the
    model's in-flight count. Called from the body's `finally`, and as the response's background task, which
    Starlette runs even when the client left before the body started (a body never started never reaches
    its `finally`, and the count would leak, holding the load-adaptive policy at "loaded")."""

    def __init__(self, chunks: AsyncIterator[ChatChunk], in_flight: dict[str, int] | None, model: str) -> None:
        self.chunks, self.in_flight, self.model = chunks, in_flight, model
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            await self.chunks.aclose()
        finally:
            if self.in_flight is not None:
                self.in_flight[self.model] -= 1


class ChatService:
    """Answers chat requests through the stages of this module's docstring."""

    def __init__(self, backends: dict[str, ChatBackend], rag: RagPlanner,
                 model_rag: dict[str, ModelRagConfig | None], cache: AnswerCache, load: LoadMonitor,
                 metrics: GatewayMetrics) -> None:
        self.backends = backends
        self.rag = rag
        self.model_rag = model_rag
        self.cache = cache
        self.load = load
        self.metrics = metrics  # per-request series for /metrics
        # Requests each model is working on (cache misses and hit audits): the queue depth the load-adaptive
        # policy reads.
        self.in_flight: dict[str, int] = defaultdict(int)
        # A sampled share of the hits answered again in the background (semantic_cache.audit; off by default).
        self.audits = HitAudits(HitAuditor(cache.settings.audit), rag, metrics, cache.embed_function,
                                self.in_flight)
        for name in backends:
            load.watch_queue(name, lambda name=name: self.in_flight[name])

    def backend_for(self, model: str) -> ChatBackend:
        backend = self.backends.get(model)
        if backend is None:
            raise GatewayError(404, f"The model '{model}' does not exist on this gateway; "
                                    f"available: {', '.join(sorted(self.backends))}",
                               code="model_not_found", param="model")
        return backend

    def _headers(self, ctx: RequestContext) -> dict[str, str]:
        headers = {"x-request-id": ctx.request_id, "x-blendgate-backend": ctx.backend or ""}
        cache = ctx.semantic_cache
        if cache is not None:
            headers["x-blendgate-cache"] = cache["status"]
            if cache.get("category"):
                headers["x-blendgate-cache-category"] = cache["category"]
            if cache["status"] == "hit":
                headers["x-blendgate-cache-similarity"] = str(cache["similarity"])
                headers["age"] = str(int(cache["age_s"]))
        return headers

    async def handle(self, request: ChatCompletionRequest, tenant: str,
                     headers: Mapping[str, str] | None = None) -> JSONResponse | StreamingResponse:
        # 1. The backend, which refuses before the cache: a hit must not answer what a miss would refuse.
        backend = self.backend_for(request.model)
        backend.check(request)
        ctx = RequestContext()
        # 2. The semantic cache: a hit needs no retrieval and no model.
        retrieval = retrieval_for(request, self.model_rag.get(request.model))
        plan, ctx.semantic_cache = await self.cache.plan(request, tenant, headers or {},
                                                         retrieval.collection if retrieval is not None else None)
        if plan is not None:
            result = await plan.lookup()
            ctx.semantic_cache = result.report()
            if result.status == "hit":
                if self.audits.auditor.enabled and self.audits.start(
                        backend, request, tenant, plan.cache, result, retrieval, plan.vector,
                        self.load.level(request.model)):
                    ctx.semantic_cache["audited"] = True
                return self._replay(request, ctx, result)
        # 3. RAG, 4. the backend's request.
        rag = await self.rag.prepare(request, retrieval, query_vector=plan.vector if plan is not None else None)
        if rag is not None:
            ctx.rag = rag.report
        backend_request = BackendRequest.of(request, tenant, rag)
        # 5. The backend's answer, 6. the response (the cache put is in _answer, or in _frames once streamed).
        if request.stream:
            return await self._stream(backend, backend_request, ctx, plan)
        return await self._answer(backend, backend_request, ctx, plan)

    async def _answer(self, backend: ChatBackend, request: BackendRequest, ctx: RequestContext,
                      plan: AnswerCachePlan | None) -> JSONResponse:
        """A whole answer from the backend: recorded, stored in the semantic cache, sent as one JSON body."""
        model = request.model
        self.in_flight[model] += 1
        try:
            result = await backend.complete(request, ctx)
        finally:
            self.in_flight[model] -= 1
        ctx.mark_first_token()
        ctx.finished_at = time.perf_counter()
        self.load.observe_latency(model, (ctx.finished_at - ctx.arrived_at) * 1000)
        self.metrics.observe_chat(model, ctx)
        if plan is not None:
            plan.remember(result.message.get("content") or "", result.finish_reason,
                          ctx.usage.as_dict() if ctx.usage else None, ctx.rag)
        return self._completion(request.chat, ctx, result.message, result.finish_reason, result.choice)

    def _completion(self, request: ChatCompletionRequest, ctx: RequestContext, message: dict[str, Any],
                    finish_reason: str | None, choice: dict[str, Any] | None = None) -> JSONResponse:
        """A whole answer as OpenAI's chat.completion body, generated or replayed from the cache; `choice` adds
        the backend's further choice-level fields (ChatResult.choice)."""
        body = {
            "id": ctx.request_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": request.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                         **(choice or {})}],
            "usage": ctx.usage.as_dict() if ctx.usage else None,
            "system_fingerprint": None,
            "blendgate": ctx.report(),
        }
        return JSONResponse(body, headers=self._headers(ctx))

    def _replay(self, request: ChatCompletionRequest, ctx: RequestContext,
                result: LookupResult) -> JSONResponse | StreamingResponse:
        """A cached answer in the shape the client asked for: one JSON body, or SSE frames."""
        entry = result.entry
        assert entry is not None
        ctx.backend = "semantic_cache"
        usage = entry.response.get("usage")
        ctx.usage = Usage(usage["prompt_tokens"], usage["completion_tokens"]) if isinstance(usage, dict) else None
        content, finish_reason = entry.response["content"], entry.response.get("finish_reason") or "stop"
        ctx.rag = RagReport.from_cached(entry.response.get("rag"))  # the citations the answer was generated with
        ctx.mark_first_token()
        ctx.finished_at = time.perf_counter()
        if not request.stream:
            self.metrics.observe_chat(request.model, ctx)
            return self._completion(request, ctx, {"role": "assistant", "content": content}, finish_reason)

        async def chunks() -> AsyncIterator[ChatChunk]:
            for piece in _replay_pieces(content):
                yield ChatChunk(delta={"content": piece})
            yield ChatChunk(delta={}, finish_reason=finish_reason)

        first = ChatChunk(delta={"role": "assistant", "content": ""})
        return self._streaming_response(first, chunks(), request, ctx, None, counted=False)

    def _streaming_response(self, first: ChatChunk | None, chunks: AsyncIterator[ChatChunk],
                            request: ChatCompletionRequest, ctx: RequestContext, plan: AnswerCachePlan | None,
                            counted: bool) -> StreamingResponse:
        release = StreamRelease(chunks, self.in_flight if counted else None, request.model)
        return StreamingResponse(self._frames(first, chunks, request, ctx, plan, release),
                                 media_type="text/event-stream", background=BackgroundTask(release),
                                 headers={**self._headers(ctx), "cache-control": "no-cache"})

    async def _stream(self, backend: ChatBackend, request: BackendRequest,
                      ctx: RequestContext, plan: AnswerCachePlan | None) -> StreamingResponse:
        self.in_flight[request.model] += 1
        try:
            chunks = backend.stream(request, ctx)
            # Run the backend up to its first chunk before answering, so request errors keep their status code.
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                await chunks.aclose()
                raise
            return self._streaming_response(first, chunks, request.chat, ctx, plan, counted=True)
        except BaseException:
            self.in_flight[request.model] -= 1
            raise

    def _chunk_body(self, request: ChatCompletionRequest, ctx: RequestContext, choices: list[dict[str, Any]],
                    **extra: Any) -> dict[str, Any]:
        return {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
                "model": request.model, "system_fingerprint": None, "choices": choices, **extra}

    async def _frames(self, first: ChatChunk | None, chunks: AsyncIterator[ChatChunk],
                      request: ChatCompletionRequest, ctx: RequestContext,
                      plan: AnswerCachePlan | None, release: StreamRelease) -> AsyncIterator[bytes]:
        """SSE frames; the last data frame carries `blendgate` (and `usage` when the client asked).

        With a plan, the answer is stored in the semantic cache once the stream completes; a stream that
        fails or that the client cuts off is never stored. Frames of a replayed hit come with no plan."""
        pending: dict[str, Any] | None = None  # held one frame back so the report can ride on the last one
        parts: list[str] = []
        finish_reason: str | None = None
        replay = ctx.backend == "semantic_cache"

        def frame(chunk: ChatChunk) -> dict[str, Any]:
            nonlocal finish_reason
            finish_reason = chunk.finish_reason or finish_reason
            if chunk.delta.get("content"):
                ctx.mark_first_token()
                parts.append(chunk.delta["content"])
            choice = {"index": 0, "delta": chunk.delta, "logprobs": None, "finish_reason": chunk.finish_reason,
                      **chunk.choice}
            return self._chunk_body(request, ctx, [choice])

        try:
            if first is not None:
                pending = frame(first)
                async for chunk in chunks:
                    yield _sse(pending)
                    pending = frame(chunk)
        except GatewayError as exc:
            # Headers are sent already: report the failure in the stream, as OpenAI does, and end it.
            log.warning("stream %s failed: %s", ctx.request_id, exc.message)
            if pending is not None:
                yield _sse(pending)
            yield _sse(exc.body())
            yield _sse("[DONE]")
            return
        finally:
            await release()  # on client disconnect too: stops the generation behind the stream
        ctx.finished_at = time.perf_counter()
        self.metrics.observe_chat(request.model, ctx)
        if not replay:
            self.load.observe_latency(request.model, (ctx.finished_at - ctx.arrived_at) * 1000)
        if plan is not None and finish_reason is not None:
            plan.remember("".join(parts), finish_reason, ctx.usage.as_dict() if ctx.usage else None, ctx.rag)
        if request.include_usage_in_stream():
            if pending is not None:
                yield _sse(pending)
            usage = ctx.usage.as_dict() if ctx.usage else None
            pending = self._chunk_body(request, ctx, [], usage=usage)
        if pending is not None:
            pending["blendgate"] = ctx.report()
            yield _sse(pending)
        yield _sse("[DONE]")
