"""What every backend offers the chat service (ChatBackend), what it answers with (ChatChunk, ChatResult),
and the per-request context every layer reports into (RequestContext). What a backend is asked is a
BackendRequest (request.py)."""

from __future__ import annotations

import abc
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, TypeVar

from ...engine.prefill_report import PrefillReport
from ..errors import GatewayError
from ..rag_report import RagReport
from ..schemas import ChatCompletionRequest
from .request import BackendRequest

Loaded = TypeVar("Loaded")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class RequestContext:
    """One chat request's identity and what the layers it passed through report about it: the interface
    between every layer of a request (semantic cache, RAG, backend, prefill) and the response's `blendgate`
    object (`report()`) and the per-request series (gateway/metrics/). Each layer fills its own slots;
    times are time.perf_counter() seconds.
    """

    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    arrived_at: float = field(default_factory=time.perf_counter)
    backend: str | None = None
    queue_s: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    usage: Usage | None = None
    semantic_cache: dict[str, Any] | None = None  # semcache's LookupResult.report(), or why it was bypassed
    rag: RagReport | None = None
    chunk_cache: PrefillReport | None = None

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def report(self) -> dict[str, Any]:
        def ms(end: float | None) -> float | None:
            return None if end is None else round((end - self.arrived_at) * 1000, 2)

        return {
            "request_id": self.request_id,
            "backend": self.backend,
            "timings": {
                "queue_ms": None if self.queue_s is None else round(self.queue_s * 1000, 2),
                "ttft_ms": ms(self.first_token_at),
                "total_ms": ms(self.finished_at),
            },
            "semantic_cache": self.semantic_cache,
            "rag": None if self.rag is None else self.rag.as_dict(),
            "chunk_cache": None if self.chunk_cache is None else self.chunk_cache.as_dict(),
        }


@dataclass
class ChatChunk:
    """A piece of a streamed answer: an OpenAI `delta` and, on the last piece, the finish reason; `choice` holds
    further choice-level fields the backend passes on as they came (e.g. `logprobs`)."""

    delta: dict[str, Any]
    finish_reason: str | None = None
    choice: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatResult:
    """A whole answer: OpenAI's `message`, the finish reason, and further choice-level fields (`choice`, as for
    ChatChunk)."""

    message: dict[str, Any]
    finish_reason: str | None
    choice: dict[str, Any] = field(default_factory=dict)


def loaded_or_503(part: Loaded | None, model: str, error: str | None, loading: str) -> Loaded:
    """What a backend loads in the background (engine, tokenizer), once it is there; before that a 503
    saying whether loading failed or is still under way, so clients know whether to retry."""
    if part is not None:
        return part
    if error is not None:
        raise GatewayError(503, f"model {model} failed to load: {error}", code="model_unavailable")
    raise GatewayError(503, f"model {model} is still {loading}; retry shortly (see /healthz)", code="model_loading")


class ChatBackend(abc.ABC):
    """A model the gateway can answer with. Request errors are raised as GatewayError before the
    first chunk of a stream, so they still get their status code."""

    kind: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin getting ready; may return before the backend is ready (see status())."""

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """{"state": "ready" | "loading" | "failed", ...details}."""

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse (GatewayError, 4xx) a request this backend cannot take, e.g. content parts it cannot carry.
        Called before anything else serves the request (the semantic cache first), so that a request is
        answered or refused the same way whether its answer is cached or not. By default: all are taken."""

    @abc.abstractmethod
    def stream(self, request: BackendRequest, ctx: RequestContext) -> AsyncIterator[ChatChunk]:
        """The answer in pieces; the request's chat request has passed check()."""

    async def complete(self, request: BackendRequest, ctx: RequestContext) -> ChatResult:
        """A whole answer; by default gathered from stream()."""
        parts: list[str] = []
        finish_reason = None
        role = "assistant"
        async for chunk in self.stream(request, ctx):
            role = chunk.delta.get("role", role)
            if chunk.delta.get("content"):
                ctx.mark_first_token()
                parts.append(chunk.delta["content"])
            finish_reason = chunk.finish_reason or finish_reason
        return ChatResult(message={"role": role, "content": "".join(parts)}, finish_reason=finish_reason)
