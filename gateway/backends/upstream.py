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
from .base import ChatBackend, ChatChunk, ChatResult, RequestContext, Usage, loaded_or_503

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


def _as_dict(obj: Any) -> dict[str, Any]:
    data = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
    return {k: v for k, v in data.items() if v is not None}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it was raised from (litellm wraps transport errors several times)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


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

    def _translate(self, exc: Exception) -> GatewayError:
        litellm = self.litellm
        name = f"upstream {self.config.litellm_model}"
        message = getattr(exc, "message", None) or str(exc)
        where = "its default address"
        if self.config.api_base:  # shown without a key in its query string or userinfo
            where = redact_url(self.config.api_base)
            message = message.replace(self.config.api_base, where)
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

    async def complete(self, request: ChatCompletionRequest, ctx: RequestContext) -> ChatResult:
        ctx.backend = self.kind
        try:
            response = await self._library().acompletion(**self._arguments(request, stream=False))
        except Exception as exc:
            raise self._translate(exc) from exc
        ctx.mark_first_token()
        choice = response.choices[0]
        if response.usage is not None:
            ctx.usage = Usage(response.usage.prompt_tokens or 0, response.usage.completion_tokens or 0)
        message = _as_dict(choice.message)
        message.setdefault("content", None)
        return ChatResult(message=message, finish_reason=choice.finish_reason)

    async def stream(self, request: ChatCompletionRequest, ctx: RequestContext) -> AsyncIterator[ChatChunk]:
        ctx.backend = self.kind
        try:
            response = await self._library().acompletion(**self._arguments(request, stream=True))
        except Exception as exc:
            raise self._translate(exc) from exc
        try:
            async for chunk in response:
                usage = getattr(chunk, "usage", None)
                if usage is not None:
                    ctx.usage = Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0)
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = _as_dict(choice.delta) if choice.delta is not None else {}
                # litellm fills fields the upstream did not send; keep what an OpenAI delta carries.
                delta = {k: v for k, v in delta.items() if k in ("role", "content", "tool_calls", "refusal")}
                if delta or choice.finish_reason:
                    yield ChatChunk(delta=delta, finish_reason=choice.finish_reason)
        except GatewayError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            close = getattr(response, "aclose", None)
            if close is not None:
                await close()
