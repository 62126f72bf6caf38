"""The chat endpoint's work: pick the backend, run it, and shape OpenAI responses and SSE streams."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from .backends.base import ChatBackend, ChatChunk, RequestContext
from .config import ModelRagConfig
from .errors import GatewayError
from .rag import RagPlanner
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


class ChatService:
    def __init__(self, backends: dict[str, ChatBackend], rag: RagPlanner,
                 model_rag: dict[str, ModelRagConfig | None]) -> None:
        self.backends = backends
        self.rag = rag
        self.model_rag = model_rag

    def backend_for(self, model: str) -> ChatBackend:
        backend = self.backends.get(model)
        if backend is None:
            raise GatewayError(404, f"The model '{model}' does not exist on this gateway; "
                                    f"available: {', '.join(sorted(self.backends))}",
                               code="model_not_found", param="model")
        return backend

    def _headers(self, ctx: RequestContext) -> dict[str, str]:
        return {"x-request-id": ctx.request_id, "x-blendgate-backend": ctx.backend or ""}

    async def handle(self, request: ChatCompletionRequest, tenant: str) -> JSONResponse | StreamingResponse:
        backend = self.backend_for(request.model)
        ctx = RequestContext(tenant=tenant)
        request, ctx.rag = await self.rag.prepare(request, self.model_rag.get(request.model))
        if request.stream:
            return await self._stream(backend, request, ctx)
        result = await backend.complete(request, ctx)
        ctx.mark_first_token()
        ctx.finished_at = time.perf_counter()
        body = {
            "id": ctx.request_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": request.model,
            "choices": [{"index": 0, "message": result.message, "logprobs": None,
                         "finish_reason": result.finish_reason}],
            "usage": ctx.usage.as_dict() if ctx.usage else None,
            "system_fingerprint": None,
            "blendgate": ctx.report(),
        }
        return JSONResponse(body, headers=self._headers(ctx))

    async def _stream(self, backend: ChatBackend, request: ChatCompletionRequest,
                      ctx: RequestContext) -> StreamingResponse:
        chunks = backend.stream(request, ctx)
        # Run the backend up to its first chunk before answering, so request errors keep their status code.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await chunks.aclose()
            raise
        return StreamingResponse(self._frames(first, chunks, request, ctx), media_type="text/event-stream",
                                 headers={**self._headers(ctx), "cache-control": "no-cache"})

    def _chunk_body(self, request: ChatCompletionRequest, ctx: RequestContext, choices: list[dict[str, Any]],
                    **extra: Any) -> dict[str, Any]:
        return {"id": ctx.request_id, "object": "chat.completion.chunk", "created": ctx.created,
                "model": request.model, "system_fingerprint": None, "choices": choices, **extra}

    async def _frames(self, first: ChatChunk | None, chunks: AsyncIterator[ChatChunk],
                      request: ChatCompletionRequest, ctx: RequestContext) -> AsyncIterator[bytes]:
        """SSE frames; the last data frame carries `blendgate` (and `usage` when the client asked)."""
        pending: dict[str, Any] | None = None  # held one frame back so the report can ride on the last one

        def frame(chunk: ChatChunk) -> dict[str, Any]:
            if chunk.delta.get("content"):
                ctx.mark_first_token()
            choice = {"index": 0, "delta": chunk.delta, "logprobs": None, "finish_reason": chunk.finish_reason}
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
            await chunks.aclose()  # on client disconnect too: stops the generation behind the stream
        ctx.finished_at = time.perf_counter()
        if request.include_usage_in_stream():
            if pending is not None:
                yield _sse(pending)
            usage = ctx.usage.as_dict() if ctx.usage else None
            pending = self._chunk_body(request, ctx, [], usage=usage)
        if pending is not None:
            pending["blendgate"] = ctx.report()
            yield _sse(pending)
        yield _sse("[DONE]")
