"""The answer cache: the semantic cache (blendgate.semcache) in front of the chat backends, as the chat
endpoint uses it.

`AnswerCache` decides whether a chat request goes through the cache and builds its key: the question,
the context digest of everything else the answer depends on, and the per-request controls (headers and
LiteLLM's `cache` object). An applicable request becomes an `AnswerCachePlan`, the hand-off between the
chat service and the semantic cache: it looks the answer up and, after a miss, stores the backend's
answer. `build_semantic_cache` builds the cache and its answer store (semcache/answer_store.py) from
the settings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..retriever.document_store import CollectionVersion
from ..retriever.embedder import Embedder
from ..retriever.service import Retriever
from ..semcache.answer_store import AnswerStore, MemoryAnswerStore, RedisAnswerStore
from ..semcache.cache import SemanticCache
from ..semcache.categories import Classification
from ..semcache.lookup import CacheQuery, LookupResult
from ..semcache.metrics import SemanticCacheMetrics
from ..semcache.policy import LoadMonitor
from ..semcache.settings import SemanticCacheSettings
from .config import LocalModelConfig, Settings
from .errors import GatewayError
from .loadable import Loadable
from .rag_report import RagReport
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")

# Requests with these are never cached: their answers are not plain text for one question.
_UNCACHEABLE_PARAMS = ("tools", "functions", "logprobs", "top_logprobs", "audio", "modalities", "prediction")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def readable_settings(key: dict[str, Any]) -> dict[str, Any]:
    """A cache key's context as people read it (the admin UI's "cached under"): what was set, with long parts
    (earlier turns, inline documents, the RAG system prompt) as a count and a short digest, so that two
    entries of one question show where they differ without holding the conversation twice."""
    shown: dict[str, Any] = {}
    for name, value in key.items():
        if value is None or value == [] or value == {}:
            continue
        if name == "history":
            shown[name] = {"messages": len(value), "digest": _digest(value)[:8]}
        elif name == "rag_system_prompt":
            shown[name] = {"digest": _digest(value)[:8]}
        elif name == "params":
            shown[name] = {k: {"count": len(v), "digest": _digest(v)[:8]} if k == "documents" else v
                           for k, v in value.items()}
        else:
            shown[name] = value
    return json.loads(json.dumps(shown, default=str))  # JSON values only: the entry stores it as JSON


def embedder_fingerprint(embedder: Embedder) -> str:
    """Names the embedding space; entries and thresholds of another embedder are never reused."""
    hasher = hashlib.blake2b(f"{embedder.name}:{embedder.dimension}".encode(), digest_size=6)
    config = embedder.path / "config.json"
    if config.exists():
        hasher.update(config.read_bytes())
    return hasher.hexdigest()


def build_semantic_cache(settings: SemanticCacheSettings, embedder: Embedder, metrics: SemanticCacheMetrics,
                         load: LoadMonitor) -> SemanticCache:
    store: AnswerStore
    if settings.redis_url:
        store = RedisAnswerStore(settings.redis_url, settings.key_prefix, embedder_fingerprint(embedder),
                           settings.redis_timeout_ms / 1000)
    else:
        store = MemoryAnswerStore()
    if embedder.name != settings.thresholds_tuned_for:
        log.warning("semantic cache: thresholds were tuned for %s but the embedder is %s; tune "
                    "semantic_cache.categories for it (blendgate tune-thresholds)", settings.thresholds_tuned_for,
                    embedder.name)
    return SemanticCache(settings, store, embedder.dimension, embedder.embed, metrics, load)


def model_fingerprints(settings: Settings) -> dict[str, str]:
    """Per model name, a hash of its configuration: the model's entry (upstream model string and address, weights,
    dtype, sampling defaults, prefill settings...) and, for a model on the gateway's own engine, the chunk-cache
    settings it blends with (sizes and places left out). It is part of the semantic-cache key, so an answer made
    under another configuration of the model (one routed to another provider model, say) is never served."""
    blending = settings.chunk_cache.model_dump(mode="json", exclude={"gpu_bytes", "cpu_bytes", "disk_bytes",
                                                                     "disk_dir"})
    fingerprints = {}
    for model in settings.models:
        data = {"model": model.model_dump(mode="json", exclude={"name"}),
                "blending": blending if isinstance(model, LocalModelConfig) else None}
        fingerprints[model.name] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    return fingerprints


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


def end_user(request: ChatCompletionRequest, headers: Mapping[str, str]) -> str | None:
    """Who is asking inside the tenant: the body's `user` (OpenAI's end-user id), else the x-blendgate-user
    header; None when neither names one (blank counts as none)."""
    for user in (request.user, headers.get("x-blendgate-user")):
        if user and user.strip():
            return user
    return None


@dataclass
class AnswerCachePlan:
    """One chat request the answer cache applies to (the hand-off from AnswerCache.plan to the chat service):
    its query and embedding, ready for lookup, then its lookup result and classification, ready for storing
    the backend's answer after a miss."""

    cache: SemanticCache
    query: CacheQuery
    vector: np.ndarray
    classification: Classification | None = None
    result: LookupResult | None = None

    async def lookup(self) -> LookupResult:
        self.result = await self.cache.lookup(self.query, self.vector)
        self.classification = self.result.classification
        return self.result

    def remember(self, content: str, finish_reason: str | None, usage: dict | None,
                 rag: RagReport | None = None) -> None:
        """Store a completed answer in the background; answers cut short by length are kept too, as OpenAI
        would return them again for the same max_tokens (which is part of the key). `rag`: the RAG report the
        answer was generated with, whose citations a hit returns with it (RagReport.from_cached)."""
        if self.classification is None or self.result is None or self.result.status == "hit":
            return
        response = {"content": content, "finish_reason": finish_reason, "usage": usage,
                    "rag": None if rag is None else rag.cached()}
        task = asyncio.create_task(self.cache.put(self.query, self.vector, self.classification.category, response))
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("semantic cache: storing an answer failed: %r", task.exception())


class AnswerCache:
    """The answer cache in front of the backends: decides whether a chat request goes through the semantic
    cache (`plan`) and builds its key (`context`)."""

    def __init__(self, settings: SemanticCacheSettings, default_temperature: Callable[[str], float | None],
                 rag_system_prompt: str, model_fingerprints: Mapping[str, str], *,
                 retriever: Loadable[Retriever] | None = None, semantic: Loadable[SemanticCache] | None = None) -> None:
        """`retriever`: embeds questions and knows the collections' versions; `semantic`: the cache, loaded
        after the retriever (both loading for ever when left out: keys can still be computed)."""
        self.settings = settings
        self.default_temperature = default_temperature
        self.model_fingerprints = model_fingerprints
        self.rag_system_prompt = rag_system_prompt
        self.retriever: Loadable[Retriever] = retriever or Loadable()
        self.semantic: Loadable[SemanticCache] = semantic or Loadable()

    def embed_function(self) -> Callable[[list[str]], np.ndarray] | None:
        """The cache's embedder (unit-length vectors), or None while the retriever loads."""
        retriever = self.retriever.value
        return retriever.embedder.embed if retriever is not None else None

    def collection_version(self, collection: str) -> CollectionVersion | None:
        retriever = self.retriever.value
        return retriever.collection_version(collection) if retriever is not None else None

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

    def context(self, request: ChatCompletionRequest, namespace: str | None,
                collection: str | None) -> tuple[str, dict[str, Any]]:
        """The cache key's context and its readable form (`readable_settings`, stored with the entry): the hash
        of everything besides the question's text that the answer depends on: the model and its configuration
        (model_fingerprints), the namespace, earlier messages, the question's other fields (its name, non-text
        parts), every answer-changing parameter (ChatCompletionRequest.answer_params), and the RAG
        collection's generation, version and prompt. Only equal digests share answers."""
        history = [m.model_dump(mode="json", exclude_none=True) for m in request.messages[:-1]]
        question = request.messages[-1].model_dump(mode="json", exclude_none=True)
        parts = question.pop("content", None)
        question["parts"] = [p for p in parts if p.get("type") != "text"] if isinstance(parts, list) else []
        key = {"model": request.model, "model_config": self.model_fingerprints.get(request.model),
               "namespace": namespace, "history": history, "question": question,
               "params": request.answer_params(),
               "collection": collection,
               # generation and version: a collection deleted and created again is another collection
               "version": str(self.collection_version(collection)) if collection else None,
               "rag_system_prompt": self.rag_system_prompt if collection or request.documents else None}
        return _digest(key), readable_settings(key)

    async def plan(self, request: ChatCompletionRequest, tenant: str, headers: Mapping[str, str],
                   collection: str | None) -> tuple[AnswerCachePlan | None, dict[str, Any] | None]:
        """(plan, None) when the cache applies, else (None, a report saying why not)."""
        controls = cache_controls(request, headers)
        if not self.settings.enabled:
            return None, None
        cache, retriever = self.semantic.value, self.retriever.value
        if cache is None or retriever is None:
            return None, {"status": "bypass", "reason": "loading"}
        reason = self.skip_reason(request)
        if reason is not None:
            return None, {"status": "bypass", "reason": reason}
        text = request.messages[-1].text().strip()
        vector = (await asyncio.to_thread(retriever.embedder.embed, [text]))[0]
        context, settings = await asyncio.to_thread(self.context, request, controls.namespace, collection)
        query = CacheQuery(tenant=tenant, model=request.model, text=text, context=context, collection=collection,
                           settings=settings, user=end_user(request, headers),
                           no_cache=controls.no_cache, no_store=controls.no_store, ttl_s=controls.ttl_s,
                           max_age_s=controls.max_age_s)
        return AnswerCachePlan(cache, query, vector), None
