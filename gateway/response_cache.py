"""The semantic cache as the chat endpoint uses it: what a request's cache key covers, its per-request
controls (headers and LiteLLM's `cache` object), and building the cache from the settings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from prometheus_client import CollectorRegistry

from ..retriever.embedder import Embedder
from ..semcache.cache import CacheQuery, LookupResult, SemanticCache
from ..semcache.categories import Classification
from ..semcache.metrics import SemanticCacheMetrics
from ..semcache.policy import LoadMonitor
from ..semcache.settings import SemanticCacheSettings
from ..semcache.stores import EntryStore, MemoryStore, RedisStore
from .errors import GatewayError
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")

# Request parameters that change the answer, and so belong to the cache key besides the question.
_ANSWER_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
                  "frequency_penalty", "response_format", "logit_bias", "blend", "rag", "documents")
# Requests with these are never cached: their answers are not plain text for one question.
_UNCACHEABLE_PARAMS = ("tools", "functions", "logprobs", "top_logprobs", "audio", "modalities", "prediction")


def embedder_fingerprint(embedder: Embedder) -> str:
    """Names the embedding space; entries and thresholds of another embedder are never reused."""
    hasher = hashlib.blake2b(f"{embedder.name}:{embedder.dimension}".encode(), digest_size=6)
    config = embedder.path / "config.json"
    if config.exists():
        hasher.update(config.read_bytes())
    return hasher.hexdigest()


def build_semantic_cache(settings: SemanticCacheSettings, embedder: Embedder, registry: CollectorRegistry,
                         load: LoadMonitor) -> SemanticCache:
    store: EntryStore
    if settings.redis_url:
        store = RedisStore(settings.redis_url, settings.key_prefix, embedder_fingerprint(embedder),
                           settings.redis_timeout_ms / 1000)
    else:
        store = MemoryStore()
    if embedder.name != settings.thresholds_tuned_for:
        log.warning("semantic cache: thresholds were tuned for %s but the embedder is %s; tune "
                    "semantic_cache.categories for it (blendgate tune-thresholds)", settings.thresholds_tuned_for,
                    embedder.name)
    return SemanticCache(settings, store, embedder.dimension, embedder.embed, SemanticCacheMetrics(registry), load)


@dataclass
class CacheControls:
    no_cache: bool = False
    no_store: bool = False
    ttl_s: float | None = None
    max_age_s: float | None = None
    namespace: str | None = None


def _positive_number(value: str, name: str, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not math.isfinite(number) or number < 0 or number == 0 and not allow_zero:
        raise GatewayError(400, f"{name} must be a {'non-negative' if allow_zero else 'positive'} number of "
                                f"seconds, not {value!r}", code="invalid_value", param=name)
    return number


def cache_controls(request: ChatCompletionRequest, headers: Mapping[str, str]) -> CacheControls:
    """Body `cache` (LiteLLM's convention) first, then `Cache-Control` and `x-blendgate-cache-*` headers."""
    controls = CacheControls()
    if request.cache is not None:
        controls = CacheControls(request.cache.no_cache, request.cache.no_store, request.cache.ttl,
                                 request.cache.s_maxage, request.cache.namespace)
    for directive in (headers.get("cache-control") or "").split(","):
        name, _, value = directive.strip().lower().partition("=")
        if name == "no-cache":
            controls.no_cache = True
        elif name == "no-store":
            controls.no_store = True
        elif name in ("max-age", "s-maxage"):
            # max-age=0 (what browsers send on reload) is valid HTTP: no stored answer is young enough.
            controls.max_age_s = _positive_number(value, "Cache-Control max-age", allow_zero=True)
    if "x-blendgate-cache-ttl" in headers:
        controls.ttl_s = _positive_number(headers["x-blendgate-cache-ttl"], "x-blendgate-cache-ttl")
    if headers.get("x-blendgate-cache-namespace"):
        controls.namespace = headers["x-blendgate-cache-namespace"]
    return controls


@dataclass
class CachePlan:
    """A request the cache can answer: its query, embedding and category, ready for lookup and storing."""

    cache: SemanticCache
    query: CacheQuery
    vector: np.ndarray
    classification: Classification | None = None
    result: LookupResult | None = None

    async def lookup(self) -> LookupResult:
        self.result = await self.cache.lookup(self.query, self.vector)
        self.classification = self.result.classification
        return self.result

    def remember(self, content: str, finish_reason: str | None, usage: dict | None) -> None:
        """Store a completed answer in the background; answers cut short by length are kept too, as OpenAI
        would return them again for the same max_tokens (which is part of the key)."""
        if self.classification is None or self.result is None or self.result.status == "hit":
            return
        response = {"content": content, "finish_reason": finish_reason, "usage": usage}
        task = asyncio.create_task(self.cache.put(self.query, self.vector, self.classification.category, response))
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("semantic cache: storing an answer failed: %r", task.exception())


class ChatCache:
    """Decides whether a chat request goes through the semantic cache and prepares its key."""

    def __init__(self, settings: SemanticCacheSettings, default_temperature: Callable[[str], float | None],
                 rag_system_prompt: str) -> None:
        self.settings = settings
        self.default_temperature = default_temperature
        self.rag_system_prompt = rag_system_prompt
        self.cache: SemanticCache | None = None
        self.embed: Callable[[list[str]], np.ndarray] | None = None
        self.collection_version: Callable[[str], int | None] = lambda name: None

    def skip_reason(self, request: ChatCompletionRequest) -> str | None:
        extra = request.model_extra or {}
        if any(extra.get(name) for name in _UNCACHEABLE_PARAMS):
            return "uncacheable_parameters"
        if request.messages[-1].role != "user" or not request.messages[-1].text().strip():
            return "no_question"
        if request.messages[-1].non_text_parts():  # the key holds the question's text only, not an image
            return "non_text_content"
        temperature = request.temperature if request.temperature is not None else \
            self.default_temperature(request.model)
        if temperature is not None and temperature > self.settings.max_cacheable_temperature:
            return "temperature"
        return None

    def context_digest(self, request: ChatCompletionRequest, namespace: str | None,
                       collection: str | None) -> str:
        data = request.model_dump(exclude_unset=True, by_alias=True)
        extra = request.model_extra or {}
        params = {k: data.get(k, extra.get(k)) for k in _ANSWER_PARAMS if k in data or k in extra}
        history = [m.model_dump(exclude_none=True) for m in request.messages[:-1]]
        key = {"model": request.model, "namespace": namespace, "history": history, "params": params,
               "collection": collection,
               "version": self.collection_version(collection) if collection else None,
               "rag_system_prompt": self.rag_system_prompt if collection or request.documents else None}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    async def plan(self, request: ChatCompletionRequest, tenant: str, headers: Mapping[str, str],
                   collection: str | None) -> tuple[CachePlan | None, dict[str, Any] | None]:
        """(plan, None) when the cache applies, else (None, a report saying why not)."""
        controls = cache_controls(request, headers)
        if not self.settings.enabled:
            return None, None
        if self.cache is None or self.embed is None:
            return None, {"status": "bypass", "reason": "loading"}
        reason = self.skip_reason(request)
        if reason is not None:
            return None, {"status": "bypass", "reason": reason}
        text = request.messages[-1].text().strip()
        vector = (await asyncio.to_thread(self.embed, [text]))[0]
        context = await asyncio.to_thread(self.context_digest, request, controls.namespace, collection)
        query = CacheQuery(tenant=tenant, model=request.model, text=text, context=context, collection=collection,
                           no_cache=controls.no_cache, no_store=controls.no_store, ttl_s=controls.ttl_s,
                           max_age_s=controls.max_age_s)
        return CachePlan(self.cache, query, vector), None
