"""The chat endpoint's work: pick the backend, run it, and shape OpenAI responses and SSE streams."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from typing import Any, AsyncIterator, Mapping

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..semcache.lookup import LookupResult
from ..semcache.policy import LoadMonitor
from .answer_cache import AnswerCache, AnswerCachePlan
from .backends.base import ChatBackend, ChatChunk, RequestContext, Usage
from .config import ModelRagConfig
from .errors import GatewayError
from .metrics import GatewayMetrics
from .rag import RagPlanner
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
    def __init__(self, backends: dict[str, ChatBackend], rag: RagPlanner,
                 model_rag: dict[str, ModelRagConfig | None], cache: AnswerCache, load: LoadMonitor) -> None:
        self.backends = backends
        self.rag = rag
        self.model_rag = model_rag
        self.cache = cache
        self.load = load
        # Requests each model is working on (cache misses): the queue depth the load-adaptive policy reads.
        self.in_flight: dict[str, int] = defaultdict(int)
        self.metrics: GatewayMetrics | None = None  # set by the app: per-request series for /metrics
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

    def _collection(self, request: ChatCompletionRequest, model_rag: ModelRagConfig | None) -> str | None:
        if request.documents is not None:
            return None
        options = request.rag or model_rag
        return options.collection if options is not None else None

    async def handle(self, request: ChatCompletionRequest, tenant: str,
                     headers: Mapping[str, str] | None = None) -> JSONResponse | StreamingResponse:
        backend = self.backend_for(request.model)
        backend.check(request)  # before the cache: a hit must not answer what a miss would refuse
        ctx = RequestContext(tenant=tenant)
        model_rag = self.model_rag.get(request.model)
        # The semantic cache comes first: a hit needs no retrieval and no model.
        plan, ctx.semantic_cache = await self.cache.plan(request, tenant, headers or {},
                                                         self._collection(request, model_rag))
        if plan is not None:
            result = await plan.lookup()
            ctx.semantic_cache = result.report()
            if result.status == "hit":
                return self._replay(request, ctx, result)
        request, ctx.rag = await self.rag.prepare(request, model_rag,
                                                  query_vector=plan.vector if plan is not None else None)
        self.in_flight[request.model] += 1
        if request.stream:
            try:
                return await self._stream(backend, request, ctx, plan)
            except BaseException:
                self.in_flight[request.model] -= 1
                raise
        try:
            result = await backend.complete(request, ctx)
        finally:
            self.in_flight[request.model] -= 1
        ctx.mark_first_token()
        ctx.finished_at = time.perf_counter()
        self.load.observe_latency(request.model, (ctx.finished_at - ctx.arrived_at) * 1000)
        self._observe(request, ctx)
        if plan is not None:
            plan.remember(result.message.get("content") or "", result.finish_reason,
                          ctx.usage.as_dict() if ctx.usage else None)
        return self._completion(request, ctx, result.message, result.finish_reason, result.choice)

    def _observe(self, request: ChatCompletionRequest, ctx: RequestContext) -> None:
        if self.metrics is not None:
            self.metrics.observe_chat(request.model, ctx)

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
        ctx.mark_first_token()
        ctx.finished_at = time.perf_counter()
        if not request.stream:
            self._observe(request, ctx)
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

    async def _stream(self, backend: ChatBackend, request: ChatCompletionRequest,
                      ctx: RequestContext, plan: AnswerCachePlan | None) -> StreamingResponse:
        chunks = backend.stream(request, ctx)
        # Run the backend up to its first chunk before answering, so request errors keep their status code.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        return self._streaming_response(first, chunks, request, ctx, plan, counted=True)

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
        self._observe(request, ctx)
        if not replay:
            self.load.observe_latency(request.model, (ctx.finished_at - ctx.arrived_at) * 1000)
        if plan is not None and finish_reason is not None:
            plan.remember("".join(parts), finish_reason, ctx.usage.as_dict() if ctx.usage else None)
        if request.include_usage_in_stream():
            if pending is not None:
                yield _sse(pending)
            usage = ctx.usage.as_dict() if ctx.usage else None
            pending = self._chunk_body(request, ctx, [], usage=usage)
        if pending is not None:
            pending["blendgate"] = ctx.report()
            yield _sse(pending)
        yield _sse("[DONE]")
