"""Chat on SGLang workers over SGLang's HTTP API (`POST /generate`, `GET /health`).

The gateway renders the chat template and tokenises (with the served model's tokenizer), then sends token
ids. A RAG prompt's chunks are marked by token spans sent alongside, in `sampling_params.custom_params`
(the one free-form field SGLang carries from the request to the scheduler), rather than by separator tokens
in the prompt: the worker sees exactly the tokens the local engine would, chunk keys are computed from the
same token ids, and a stock worker, which ignores the spans, still answers the same prompt (prefilled in
full). Workers with blendgate's plugin blend the chunks' cached KV and report what they reused in
`meta_info["blendgate"]`, which this backend reads as a PrefillReport (protocol.prefill_report_of) and passes
on, with the worker and the chunks sent, in the response's `blendgate.chunk_cache`.

Which worker: routing.AffinityRouter (the home of the request's first chunk by rendezvous hashing, alike in
every gateway replica, within a load bound). Failures: a worker that refuses the connection is marked down
and the request goes to the next one (nothing was accepted, so nothing runs twice); a worker silent for
`read_timeout_s` gives 504; a worker error or a stream cut off mid-answer gives 502. A background task polls
every worker's /health, so one that comes back gets traffic again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ...chunkcache.keys import token_digest
from ...engine.prompt import Prompt
from ...engine.weights import WeightsError, load_tokenizer
from ...sglang_plugin.protocol import generate_request, prefill_report_of
from ..config import SglangModelConfig
from ..errors import GatewayError
from ..schemas import ChatCompletionRequest
from .base import ChatBackend, ChatChunk, RequestContext, Usage, loaded_or_503
from .chat_prompt import chat_prompt, check_text_chat, context_length_error, sampling_params
from .request import BackendRequest
from .routing import AffinityRouter, WorkerState

log = logging.getLogger("blendgate.gateway")

_FINISH_REASONS = {"stop": "stop", "length": "length"}


class _Meta(BaseModel):
    """The `meta_info` of a worker's event, with the types of the fields the gateway reads checked."""

    model_config = ConfigDict(extra="allow")
    finish_reason: dict[str, Any] | str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


class _Event(BaseModel):
    """One SSE event of `/generate`: the text so far (or the new piece), its meta_info, or an error. A body of
    another shape fails validation (a ValueError), which the stream reports as an unreadable event."""

    model_config = ConfigDict(extra="allow")
    text: str = ""
    meta_info: _Meta = Field(default_factory=_Meta)
    error: Any = None


def _error_message(body: bytes) -> str:
    """SGLang's error text from an error response ({"error": {"message"}} or {"message"} or plain text)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if data.get("message"):
            return str(data["message"])
    return json.dumps(data)[:500]


class SglangBackend(ChatBackend):
    kind = "sglang"

    def __init__(self, config: SglangModelConfig, *, cache_dir: Path) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self.router = AffinityRouter(config.workers, config.max_imbalance)
        self.tokenizer: Any = None
        self.client: httpx.AsyncClient | None = None
        self._error: str | None = None
        self._tasks: list[asyncio.Task] = []
        self.totals = {"requests": 0, "chunks_sent": 0, "chunks_reused": 0, "cached_tokens": 0,
                       "chunk_tokens_not_recomputed": 0}

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        headers = {}
        if self.config.api_key():
            headers["Authorization"] = f"Bearer {self.config.api_key()}"
        timeout = httpx.Timeout(self.config.read_timeout_s, connect=self.config.connect_timeout_s)
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers)
        self._tasks = [asyncio.create_task(self._load_tokenizer(), name=f"tokenizer {self.config.name}"),
                       asyncio.create_task(self._watch_health(), name=f"health {self.config.name}")]

    async def _load_tokenizer(self) -> None:
        try:
            self.tokenizer = await asyncio.to_thread(load_tokenizer, self.config.tokenizer_path, self.cache_dir)
        except (WeightsError, OSError, ValueError) as exc:
            self._error = f"cannot load the tokenizer: {exc}"
            log.error("model %s: %s", self.config.name, self._error)

    async def check_health(self) -> None:
        """One /health round over every worker."""
        async def check(worker: WorkerState) -> None:
            try:
                response = await self.client.get(f"{worker.url}/health", timeout=self.config.connect_timeout_s)
                ok, error = response.status_code == 200, f"/health answered {response.status_code}"
            except httpx.HTTPError as exc:
                ok, error = False, f"/health failed: {type(exc).__name__}: {exc}"
            if ok != worker.healthy:
                log.warning("SGLang worker %s of %s is %s%s", worker.name, self.config.name,
                            "back" if ok else "down", "" if ok else f" ({error})")
            self.router.mark(worker, ok, None if ok else error)

        await asyncio.gather(*(check(w) for w in self.router.workers.values()))

    async def _watch_health(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.config.health_interval_s)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    def status(self) -> dict[str, Any]:
        details = {"workers": self.router.report(), **self.totals}
        if self._error is not None:
            return {"state": "failed", "error": self._error, **details}
        if self.tokenizer is None:
            return {"state": "loading", **details}
        if not self.router.healthy():
            return {"state": "unavailable", "error": "no SGLang worker answers /health", **details}
        return {"state": "ready", **details}

    # -- request path -----------------------------------------------------------------------------
    def _payload(self, request: ChatCompletionRequest, prompt: Prompt, ctx: RequestContext) -> dict[str, Any]:
        limit = self.config.max_context_tokens
        if len(prompt) >= limit:
            raise context_length_error(limit, len(prompt))
        params = sampling_params(request, self.config.sampling_defaults,
                                 min(request.completion_limit() or limit, limit - len(prompt)))
        sampling: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "frequency_penalty": params.frequency_penalty, "presence_penalty": params.presence_penalty,
        }
        if request.stop_sequences:
            sampling["stop"] = request.stop_sequences
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        return generate_request(prompt, sampling, rid=ctx.request_id)

    async def _open(self, payload: dict[str, Any], digests: list[str]) -> tuple[WorkerState, httpx.Response]:
        """A streaming /generate response from the best worker that accepts the connection."""
        tried: set[str] = set()
        while True:
            worker = self.router.choose(digests, exclude=tried)
            if worker is None:
                if tried:
                    raise GatewayError(502, f"no SGLang worker of {self.config.name} could be reached "
                                            f"(tried {', '.join(sorted(tried))})", code="upstream_unreachable")
                raise GatewayError(503, f"no SGLang worker of {self.config.name} is healthy; see /healthz",
                                   code="model_unavailable")
            tried.add(worker.url)
            request = self.client.build_request("POST", f"{worker.url}/generate", json=payload)
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Refused or never connected: the worker got nothing, so the next one may take it.
                log.warning("SGLang worker %s unreachable (%s); trying another", worker.name, exc)
                self.router.mark(worker, False, f"{type(exc).__name__}: {exc}")
                continue
            except httpx.TimeoutException as exc:
                raise GatewayError(504, f"SGLang worker {worker.name} did not answer within "
                                        f"{self.config.read_timeout_s:g} s", code="upstream_timeout") from exc
            except httpx.HTTPError as exc:
                raise GatewayError(502, f"SGLang worker {worker.name} failed: {exc}", code="upstream_error") from exc
            if response.status_code == 200:
                return worker, response
            message = _error_message(await response.aread())
            await response.aclose()
            if 400 <= response.status_code < 500:
                raise GatewayError(400, f"SGLang worker {worker.name} rejected the request: {message}",
                                   code="upstream_bad_request")
            raise GatewayError(502, f"SGLang worker {worker.name} failed ({response.status_code}): {message}",
                               code="upstream_error")

    def _report(self, ctx: RequestContext, worker: WorkerState, meta: _Meta, chunks: int) -> None:
        """The worker's prefill report (the plugin's `blendgate` object) and the gateway's totals."""
        report = dataclasses.replace(prefill_report_of(meta.model_dump()), worker=worker.name, chunks_sent=chunks,
                                     cached_tokens=meta.cached_tokens)
        ctx.chunk_cache = report
        self.totals["chunks_sent"] += chunks
        self.totals["cached_tokens"] += meta.cached_tokens or 0
        self.totals["chunks_reused"] += report.hit_count if report.blended else 0  # a fallback reused none
        if report.chunk_tokens is not None and report.recomputed_tokens is not None:
            self.totals["chunk_tokens_not_recomputed"] += report.chunk_tokens - report.recomputed_tokens

    def check(self, request: ChatCompletionRequest) -> None:
        check_text_chat(request, "SGLang-served models")

    async def stream(self, request: BackendRequest, ctx: RequestContext) -> AsyncIterator[ChatChunk]:
        tokenizer = loaded_or_503(self.tokenizer, self.config.name, self._error, "loading its tokenizer")
        # Template rendering and tokenising take seconds for a body of megabytes: off the event loop.
        prompt = await asyncio.to_thread(
            chat_prompt, tokenizer, request, mode=self.config.prefill_mode, recompute_ratio=self.config.recompute_ratio,
            fidelity_target=self.config.fidelity_target, context_documents=self.config.context_documents,
            chunk_context=self.config.chunk_context)
        payload = self._payload(request.chat, prompt, ctx)
        digests = [token_digest(s.token_ids) for s in prompt.segments if s.is_chunk]
        worker, response = await self._open(payload, digests)
        self.router.started(worker)
        self.totals["requests"] += 1
        ctx.backend = self.kind
        ctx.usage = Usage(prompt_tokens=len(prompt))
        text, reported = "", False
        try:
            yield ChatChunk(delta={"role": "assistant", "content": ""})
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = _Event.model_validate_json(data)
                if event.error is not None:
                    raise GatewayError(502, f"SGLang worker {worker.name} failed mid-answer: "
                                            f"{_error_message(data.encode())}", code="upstream_error")
                meta = event.meta_info
                if not reported:
                    self._report(ctx, worker, meta, len(digests))
                    reported = True
                ctx.usage = Usage(meta.prompt_tokens or len(prompt), meta.completion_tokens or 0)
                piece = event.text
                if self.config.stream_output == "cumulative":
                    piece, text = piece[len(text):], piece
                if piece:
                    yield ChatChunk(delta={"content": piece})
                finish = meta.finish_reason
                if finish:
                    kind = finish.get("type") if isinstance(finish, dict) else str(finish)
                    if kind not in _FINISH_REASONS:  # "abort": the worker gave up on the request
                        raise GatewayError(502, f"SGLang worker {worker.name} aborted the request: "
                                                f"{finish.get('message') if isinstance(finish, dict) else finish}",
                                           code="upstream_error")
                    yield ChatChunk(delta={}, finish_reason=_FINISH_REASONS[kind])
                    return
            raise GatewayError(502, f"SGLang worker {worker.name} ended the stream without finishing the answer",
                               code="upstream_error")
        except httpx.TimeoutException as exc:
            raise GatewayError(504, f"SGLang worker {worker.name} sent nothing for {self.config.read_timeout_s:g} s",
                               code="upstream_timeout") from exc
        except httpx.HTTPError as exc:  # the connection broke: the worker died or restarted
            self.router.mark(worker, False, f"stream broke: {type(exc).__name__}: {exc}")
            raise GatewayError(502, f"SGLang worker {worker.name} broke off the answer: {exc}",
                               code="upstream_error") from exc
        except ValueError as exc:  # not JSON, or not an event's shape (pydantic's ValidationError)
            raise GatewayError(502, f"SGLang worker {worker.name} sent an unreadable event: {exc}",
                               code="upstream_error") from exc
        finally:
            self.router.finished(worker)
            await response.aclose()  # a client that left closes the connection: SGLang aborts the request
