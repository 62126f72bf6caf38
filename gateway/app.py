"""The gateway's HTTP application: routes, start-up and shutdown of the backends."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..retriever.embedder import EmbedderError
from ..retriever.loaders import SourceDocument
from ..retriever.service import CorruptIndexError, RetrievalError
from ..semcache.policy import LoadMonitor
from . import __version__
from .admin import chunk_stores, install_admin
from .auth import AdminAuth, ApiKeyAuth
from .backends.base import ChatBackend
from .backends.local import LocalBackend
from .backends.sglang import SglangBackend
from .backends.upstream import LitellmBackend
from .chat import ChatService
from .config import LocalModelConfig, Settings, SglangModelConfig
from .errors import GatewayError, install_error_handlers
from .limits import BodySizeLimit
from .metrics import GatewayMetrics, LiveStateCollector, RequestCounter
from .rag import RagPlanner, as_gateway_error, build_retriever
from .response_cache import ChatCache, build_semantic_cache
from .schemas import ChatCompletionRequest, IngestRequest, RetrieveRequest

log = logging.getLogger("blendgate.gateway")


def build_backends(settings: Settings) -> dict[str, ChatBackend]:
    backends: dict[str, ChatBackend] = {}
    for model in settings.models:
        if isinstance(model, LocalModelConfig):
            backends[model.name] = LocalBackend(model, cache_dir=settings.cache_dir,
                                                max_running=settings.max_running_requests,
                                                max_waiting=settings.max_waiting_requests,
                                                chunk_cache=settings.chunk_cache)
        elif isinstance(model, SglangModelConfig):
            backends[model.name] = SglangBackend(model, cache_dir=settings.cache_dir)
        else:
            backends[model.name] = LitellmBackend(model)
    return backends


def _default_temperature(settings: Settings):
    def default(model: str) -> float | None:
        config = settings.model(model)
        # A litellm model's default is the provider's; a request that sets none counts as cacheable.
        return config.sampling_defaults.temperature if isinstance(config, (LocalModelConfig, SglangModelConfig)) \
            else None
    return default


def create_app(settings: Settings) -> FastAPI:
    backends = build_backends(settings)
    registry = CollectorRegistry()
    load = LoadMonitor(settings.semantic_cache.load)
    rag = RagPlanner(None, settings.retrieval)
    chat_cache = ChatCache(settings.semantic_cache, _default_temperature(settings), settings.retrieval.system_prompt)
    chat = ChatService(backends, rag, {m.name: m.rag for m in settings.models}, chat_cache, load)
    auth = ApiKeyAuth(settings.tenants_by_key())
    admin = AdminAuth(settings.resolved_admin_key())
    metrics = GatewayMetrics(registry)
    chat.metrics = metrics
    registry.register(LiveStateCollector(lambda: chunk_stores(backends), lambda: dict(chat.in_flight)))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Local models load in the background: /healthz answers "loading" meanwhile.
        await asyncio.gather(*(backend.start() for backend in backends.values()))
        # Collections open before the gateway answers: a corrupt index stops start-up, naming the file.
        try:
            rag.retriever = await asyncio.to_thread(build_retriever, settings)
            await asyncio.to_thread(rag.retriever.load_all)
        except (CorruptIndexError, EmbedderError, sqlite3.DatabaseError) as exc:
            log.error("cannot open the document collections: %s", exc)
            raise SystemExit(1) from None
        log.info("retrieval ready: %d collections in %s", len(rag.retriever.collections()),
                 settings.retrieval.data_dir)
        # The semantic cache embeds with the retriever's embedder, so a RAG miss embeds its question once.
        if settings.semantic_cache.enabled:
            semantic = build_semantic_cache(settings.semantic_cache, rag.retriever.embedder, registry, load)
            await semantic.start()
            chat_cache.cache, chat_cache.embed = semantic, rag.retriever.embedder.embed
            chat_cache.collection_version = rag.retriever.collection_version
        yield
        if chat_cache.cache is not None:
            await chat_cache.cache.close()
        await asyncio.gather(*(backend.close() for backend in backends.values()), return_exceptions=True)

    app = FastAPI(title="blendgate", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestCounter, counter=metrics.requests)

    def refresh_gauges() -> None:
        if chat_cache.cache is not None:
            chat_cache.cache.effective_policies(list(backends))  # refreshes the policy gauges

    install_admin(app, settings=settings, admin=admin, metrics=metrics, chat_cache=chat_cache, backends=backends,
                  refresh_gauges=refresh_gauges)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request, tenant: str = Depends(auth)):
        raw.state.model = request.model  # the request counter's model label
        return await chat.handle(request, tenant, raw.headers)

    def model_card(name: str) -> dict:
        backend = backends[name]
        owner = "blendgate" if isinstance(backend, LocalBackend) else "sglang" if isinstance(backend, SglangBackend) \
            else backend.config.litellm_model.split("/")[0]
        return {"id": name, "object": "model", "created": 0, "owned_by": owner}

    @app.get("/v1/models")
    async def list_models(_: str = Depends(auth)):
        return {"object": "list", "data": [model_card(name) for name in backends]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, _: str = Depends(auth)):
        chat.backend_for(model)
        return model_card(model)

    def retriever():
        return rag.require_retriever()

    async def retrieval_call(function, *args):
        try:
            return await asyncio.to_thread(function, *args)
        except RetrievalError as exc:
            raise as_gateway_error(exc) from exc

    async def invalidate_collection(collection: str) -> None:
        # Answers built on the old documents must go; entries also carry the collection's version in their
        # key, which covers ingests by the CLI in another process.
        if chat_cache.cache is not None:
            removed = await chat_cache.cache.invalidate(collection=collection)
            if removed:
                log.info("semantic cache: %d entries of collection %s invalidated", removed, collection)

    @app.post("/v1/retrieve")
    async def retrieve(request: RetrieveRequest, _: str = Depends(auth)):
        with metrics.retrieval.labels("retrieve").time():
            chunks = await retrieval_call(retriever().search, request.collection, request.query, request.top_k)
        return {"object": "list", "collection": request.collection,
                "version": retriever().collection_version(request.collection),
                "data": [{**c.citation(), "text": c.text, "token_count": c.token_count} for c in chunks]}

    @app.get("/v1/collections")
    async def list_collections(_: str = Depends(auth)):
        return {"object": "list", "data": await retrieval_call(retriever().collections)}

    @app.post("/v1/collections/{collection}/documents")
    async def ingest_documents(collection: str, request: IngestRequest, _: str = Depends(auth)):
        documents = [SourceDocument(d.source or f"api#{d.id or i}", d.text) for i, d in enumerate(request.documents)]
        summary = await retrieval_call(retriever().ingest_documents, collection, documents)
        await invalidate_collection(collection)
        return summary.as_dict()

    @app.delete("/v1/collections/{collection}")
    async def delete_collection(collection: str, source: str | None = None, _: str = Depends(auth)):
        removed = await retrieval_call(retriever().delete, collection, source)
        await invalidate_collection(collection)
        return {"collection": collection, "source": source, "deleted": True, "removed_chunks": removed}

    @app.get("/metrics")
    async def prometheus_metrics():
        refresh_gauges()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/semantic-cache/false-hit")
    async def report_false_hit(body: dict, tenant: str = Depends(auth)):
        """A client says a cached answer was wrong (entry_id from the hit's blendgate.semantic_cache): it is
        counted and the entry invalidated. Only the tenant the entry belongs to may report it."""
        entry_id = body.get("entry_id")
        if not isinstance(entry_id, str) or not entry_id or set(body) != {"entry_id"}:
            raise GatewayError(400, "give entry_id (from a hit's blendgate.semantic_cache.entry_id)",
                               code="invalid_value", param="entry_id")
        cache = chat_cache.cache
        owner = cache.category_of(entry_id) if cache is not None else None
        if owner is None or owner[0] != tenant:
            raise GatewayError(404, f"no live semantic-cache entry {entry_id} of yours", code="entry_not_found")
        metrics.false_hits.labels(owner[1], tenant).inc()
        return {"reported": True, "invalidated": await cache.invalidate(entry_id=entry_id, tenant=tenant)}

    @app.get("/healthz")
    async def healthz():
        models = {name: backend.status() for name, backend in backends.items()}
        states = {m["state"] for m in models.values()}
        status = "ready" if states == {"ready"} else "failed" if "failed" in states else \
            "degraded" if "unavailable" in states else "loading"
        retrieval = {"state": "ready" if rag.retriever is not None else "loading"}
        cache = chat_cache.cache
        semantic = {"state": "disabled"} if not settings.semantic_cache.enabled else \
            {"state": "loading"} if cache is None else \
            {"state": "ready" if cache.available else "degraded", "store": cache.store.kind,
             "entries": len(cache.index), **({"error": cache.down_reason} if not cache.available else {})}
        return JSONResponse({"status": status, "models": models, "retrieval": retrieval, "semantic_cache": semantic},
                            status_code=200 if status == "ready" else 503)

    return app

