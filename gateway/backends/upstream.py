"""Chat through litellm to an upstream provider (OpenAI, Anthropic, another OpenAI-compatible server...)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncIterator

from ..config import LitellmModelConfig
from ..errors import GatewayError
from ..redaction import redact_url
from ..schemas import ChatCompletionRequest
from .base import ChatBackend, ChatChunk, ChatResult, RequestContext, loaded_or_503
from .request import BackendRequest
from .upstream_answer import MalformedAnswer, StreamReader, read_completion

log = logging.getLogger("blendgate.gateway")

# OpenAI-compatible servers without authentication still need some key for the OpenAI SDK litellm uses.
_PLACEHOLDER_KEY = "blendgate-no-key"


def _import_litellm() -> Any:
    # litellm fetches a model price list from the internet at import unless told to use its bundled copy.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    return litellm


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from (litellm wraps transport errors several times)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _provider_message(exc: BaseException, limit: int = 500) -> str:
    """What went wrong, for the client: litellm's message without the traceback and arguments it appends when
    it cannot read an answer (server paths, the whole body), on one line and at most `limit` characters."""
    message = getattr(exc, "message", None) or str(exc)
    for tail in ("Traceback (most recent call last)", "received_args="):
        message = message.split(tail, 1)[0]
    message = " ".join(message.split())
    return message if len(message) <= limit else message[:limit - 1] + "…"


def _is_connection_failure(exc: BaseException) -> bool:
    import httpx

    return any(isinstance(e, (httpx.ConnectError, ConnectionError)) for e in _chain(exc))


class LitellmBackend(ChatBackend):
    kind = "litellm"

    def __init__(self, config: LitellmModelConfig) -> None:
        self.config = config
        self.litellm: Any = None
        self._import_task: asyncio.Task | None = None
        self._error: str | None = None

    async def start(self) -> None:
        # Importing litellm takes seconds: done in a thread, after the port is open (/healthz: "loading").
        self._import_task = asyncio.create_task(self._import(), name=f"import litellm for {self.config.name}")

    async def _import(self) -> None:
        try:
            self.litellm = await asyncio.to_thread(_import_litellm)
        except ImportError as exc:
            self._error = f"cannot import litellm: {exc}"
            log.error("model %s: %s", self.config.name, self._error)

    async def close(self) -> None:
        if self._import_task is not None and not self._import_task.done():
            self._import_task.cancel()

    def status(self) -> dict[str, Any]:
        state = "ready" if self.litellm is not None else "failed" if self._error else "loading"
        return {"state": state, "upstream": self.config.litellm_model,
                **({"error": self._error} if self._error else {})}

    def _library(self) -> Any:
        return loaded_or_503(self.litellm, self.config.name, self._error, "loading litellm")

    def _arguments(self, request: ChatCompletionRequest, stream: bool) -> dict[str, Any]:
        api_key = self.config.api_key()
        if api_key is None and self.config.api_base is not None:
            api_key = _PLACEHOLDER_KEY
        arguments: dict[str, Any] = {
            **request.openai_params(),
            "model": self.config.litellm_model,
            "messages": [m.model_dump(exclude_none=True) for m in request.messages],
            "api_base": self.config.api_base,
            "api_key": api_key,
            "timeout": self.config.timeout_s,
            "stream": stream,
            "num_retries": 0,
        }
        if stream:
            # Always ask for usage, so the gateway can report it whether or not the client asked.
            arguments["stream_options"] = {"include_usage": True}
        return arguments

    def _message(self, exc: BaseException) -> str:
        """The provider's message (_provider_message), with the configured api_base shown redacted."""
        message = _provider_message(exc)
        if self.config.api_base:  # shown without a key in its query string or userinfo
            message = message.replace(self.config.api_base, redact_url(self.config.api_base))
        return message

    def _translate(self, exc: Exception) -> GatewayError:
        litellm = self.litellm
        name = f"upstream {self.config.litellm_model}"
        where = redact_url(self.config.api_base) if self.config.api_base else "its default address"
        message = self._message(exc)
        if isinstance(exc, litellm.Timeout):
            return GatewayError(504, f"{name} did not answer within {self.config.timeout_s:g} s",
                                code="upstream_timeout")
        if isinstance(exc, litellm.APIConnectionError) or _is_connection_failure(exc):
            return GatewayError(502, f"{name} is unreachable at {where}: "
                                     f"{message}", code="upstream_unreachable")
        if isinstance(exc, (litellm.AuthenticationError, litellm.PermissionDeniedError)):
            # The client's key is fine; the gateway's key for the provider is not. That is a gateway problem.
            return GatewayError(502, f"{name} refused the gateway's credentials: {message}", code="upstream_auth")
        if isinstance(exc, litellm.RateLimitError):
            return GatewayError(429, f"{name} is rate limiting: {message}", code="upstream_rate_limited")
        if isinstance(exc, litellm.ContextWindowExceededError):
            return GatewayError(413, message, code="context_length_exceeded", param="messages")
        if isinstance(exc, (litellm.BadRequestError, litellm.UnprocessableEntityError)):
            return GatewayError(400, f"{name} rejected the request: {message}", code="upstream_bad_request")
        return GatewayError(502, f"{name} failed: {message}", code="upstream_error")

    def _malformed(self, problem: MalformedAnswer) -> GatewayError:
        return GatewayError(502, f"upstream {self.config.litellm_model} answered with something the gateway "
                                 f"cannot interpret ({problem})", code="upstream_error")

    def _broken_stream(self, exc: Exception) -> GatewayError:
        """An error while reading a stream the provider had begun: it was reachable, so unless it timed out this
        is a broken or unreadable answer (502 upstream_error), not an unreachable provider."""
        if isinstance(exc, self.litellm.Timeout):
            return self._translate(exc)
        message = self._message(exc)
        return GatewayError(502, f"upstream {self.config.litellm_model} broke off its stream: {message}",
                            code="upstream_error")

    async def complete(self, request: BackendRequest, ctx: RequestContext) -> ChatResult:
        """The provider's first choice; 502 `upstream_error` for an answer that is not OpenAI's shape."""
        ctx.backend = self.kind
        try:
            response = await self._library().acompletion(**self._arguments(request.chat, stream=False))
        except Exception as exc:
            raise self._translate(exc) from exc
        try:
            result, ctx.usage = read_completion(response)
        except MalformedAnswer as problem:
            raise self._malformed(problem) from None
        ctx.mark_first_token()
        return result

    async def stream(self, request: BackendRequest, ctx: RequestContext) -> AsyncIterator[ChatChunk]:
        """The provider's stream, checked chunk by chunk (StreamReader); an empty or unreadable stream fails
        with 502 `upstream_error`, before the first chunk when nothing of it was sendable."""
        ctx.backend = self.kind
        try:
            response = await self._library().acompletion(**self._arguments(request.chat, stream=True))
        except Exception as exc:
            raise self._translate(exc) from exc
        reader = StreamReader()
        try:
            async for raw in response:
                piece = reader.feed(raw)
                ctx.usage = reader.usage or ctx.usage
                if piece is not None:
                    yield piece
            reader.end()
        except MalformedAnswer as problem:
            raise self._malformed(problem) from None
        except GatewayError:
            raise
        except Exception as exc:
            raise self._broken_stream(exc) from exc
        finally:
            close = getattr(response, "aclose", None)
            if close is not None:
                await close()
