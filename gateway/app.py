"""The gateway's HTTP application: routes, start-up and shutdown of the backends."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..retriever.embedder import EmbedderError
from ..retriever.loaders import SourceDocument
from ..retriever.service import COLLECTION_NAME, CorruptIndexError, RetrievalError
from ..semcache.metrics import SemanticCacheMetrics, TenantLabel
from ..semcache.policy import LoadMonitor
from . import __version__
from .admin import chunk_stores, install_admin
from .answer_cache import AnswerCache, build_semantic_cache, model_fingerprints
from .auth import AdminAuth, ApiKeyAuth
from .backends.base import ChatBackend
from .backends.local import LocalBackend
from .backends.sglang import SglangBackend
from .backends.upstream import LitellmBackend
from .chat import ChatService
from .config import LocalModelConfig, Settings, SglangModelConfig
from .disconnect import ClientDisconnected, unless_disconnected
from .errors import GatewayError, install_error_handlers
from .limits import BodySizeLimit
from .metrics import GatewayMetrics, LiveStateCollector, RequestCounter, snapshot
from .openapi import CLIENT_AUTH, JSON_BODY, RETRIEVAL, errors, install_openapi
from .rag import RagPlanner, as_gateway_error, build_retriever, version_fields
from .responses import (CollectionList, DeleteResult, FalseHitResult, Health, IngestResult, ModelCard, ModelList,
                        RetrieveResponse)
from .schemas import ChatCompletionRequest, FalseHitReport, IngestRequest, RetrieveRequest
from .stats_history import StatsHistory

log = logging.getLogger("blendgate.gateway")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before the answer


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


def create_app(settings: Settings, on_fatal: Callable[[], None]) -> FastAPI:
    """The gateway. `on_fatal` is called when a part it cannot serve without fails to load in the background
    (the document collections): the caller stops the server and exits non-zero."""
    backends = build_backends(settings)
    registry = CollectorRegistry()
    load = LoadMonitor(settings.semantic_cache.load)
    rag = RagPlanner(None, settings.retrieval)
    chat_cache = AnswerCache(settings.semantic_cache, _default_temperature(settings), settings.retrieval.system_prompt,
                           model_fingerprints(settings))
    chat = ChatService(backends, rag, {m.name: m.rag for m in settings.models}, chat_cache, load)
    auth = ApiKeyAuth(settings.tenants_by_key())
    admin = AdminAuth(settings.resolved_admin_key())
    tenant_label = TenantLabel(settings.metrics.tenant_label)
    metrics = GatewayMetrics(registry, tenant_label)
    chat.metrics = metrics
    registry.register(LiveStateCollector(lambda: chunk_stores(backends), lambda: dict(chat.in_flight)))
    history = StatsHistory(lambda: snapshot(metrics))  # the admin charts' recent past

    async def open_collections_and_cache() -> None:
        """The document collections, then the semantic cache (which embeds with the retriever's embedder, so
        a RAG miss embeds its question once). A collection that cannot be opened (a corrupt index) is fatal:
        it is logged, naming the file, and `on_fatal` stops the gateway."""
        try:
            retriever = await asyncio.to_thread(build_retriever, settings)
            await asyncio.to_thread(retriever.load_all)
        except (CorruptIndexError, EmbedderError, sqlite3.DatabaseError) as exc:
            log.error("cannot open the document collections: %s", exc)
            rag.retriever_error = str(exc)
            on_fatal()
            return
        rag.retriever = retriever
        log.info("retrieval ready: %d collections in %s", len(retriever.collections()), settings.retrieval.data_dir)
        if settings.semantic_cache.enabled:
            semantic = build_semantic_cache(settings.semantic_cache, retriever.embedder,
                                            SemanticCacheMetrics(registry, tenant_label), load)
            try:
                await semantic.start()
            except asyncio.CancelledError:  # shut down while starting
                await semantic.close()
                raise
            chat_cache.embed, chat_cache.collection_version = retriever.embedder.embed, retriever.collection_version
            chat_cache.cache = semantic

    def fatal_if_failed(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("start-up failed", exc_info=task.exception())
            on_fatal()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Nothing here waits for loading, so the port opens at once: models, collections and the semantic
        # cache load in the background, and /healthz answers 503 "loading" until all are ready.
        await asyncio.gather(*(backend.start() for backend in backends.values()))
        opening = asyncio.create_task(open_collections_and_cache(), name="open collections and cache")
        opening.add_done_callback(fatal_if_failed)
        history.start()
        yield
        await history.stop()
        opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        if chat_cache.cache is not None:
            await chat_cache.cache.close()
        await asyncio.gather(*(backend.close() for backend in backends.values()), return_exceptions=True)

    app = FastAPI(title="blendgate", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestCounter, counter=metrics.requests)

    def refresh_gauges() -> None:
        if chat_cache.cache is not None:
            chat_cache.cache.effective_policies(list(backends))  # refreshes the policy gauges

    install_admin(app, settings=settings, admin=admin, metrics=metrics, chat_cache=chat_cache, backends=backends,
                  history=history, refresh_gauges=refresh_gauges)

    @app.post("/v1/chat/completions", responses=errors(*CLIENT_AUTH, *JSON_BODY, 404, 429, 502, 503, 504))
    async def chat_completions(request: ChatCompletionRequest, raw: Request, tenant: str = Depends(auth)):
        raw.state.model = request.model  # the request counter's model label
        try:
            return await unless_disconnected(raw.receive, chat.handle(request, tenant, raw.headers))
        except ClientDisconnected:
            # Nobody reads this; the request counter records it under nginx's "client closed request".
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    def model_card(name: str) -> ModelCard:
        backend = backends[name]
        owner = "blendgate" if isinstance(backend, LocalBackend) else "sglang" if isinstance(backend, SglangBackend) \
            else backend.config.litellm_model.split("/")[0]
        return ModelCard(id=name, owned_by=owner)

    @app.get("/v1/models", responses=errors(*CLIENT_AUTH))
    async def list_models(_: str = Depends(auth)) -> ModelList:
        return ModelList(data=[model_card(name) for name in backends])

    @app.get("/v1/models/{model:path}", responses=errors(*CLIENT_AUTH, 404))
    async def get_model(model: str, _: str = Depends(auth)) -> ModelCard:
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

    # A collection in a path: the retriever's naming rule, declared so the document says which names exist.
    collection_name = Path(pattern=COLLECTION_NAME.pattern, description="letters, digits, '_', '-', '.'; "
                                                                         "at most 64 characters")

    @app.post("/v1/retrieve", responses=errors(*CLIENT_AUTH, *JSON_BODY, *RETRIEVAL, 404, 409))
    async def retrieve(request: RetrieveRequest, _: str = Depends(auth)) -> RetrieveResponse:
        with metrics.retrieval.labels("retrieve").time():
            chunks = await retrieval_call(retriever().search, request.collection, request.query, request.top_k)
        return RetrieveResponse(collection=request.collection,
                                **version_fields(retriever().collection_version(request.collection)),
                                data=[{**c.citation(), "text": c.text, "token_count": c.token_count} for c in chunks])

    @app.get("/v1/collections", responses=errors(*CLIENT_AUTH, *RETRIEVAL))
    async def list_collections(_: str = Depends(auth)) -> CollectionList:
        return CollectionList(data=await retrieval_call(retriever().collections))

    @app.post("/v1/collections/{collection}/documents", responses=errors(*CLIENT_AUTH, *JSON_BODY, *RETRIEVAL, 409))
    async def ingest_documents(request: IngestRequest, collection: str = collection_name,
                               _: str = Depends(auth)) -> IngestResult:
        documents = [SourceDocument(d.source or f"api#{d.id or i}", d.text) for i, d in enumerate(request.documents)]
        summary = await retrieval_call(retriever().ingest_documents, collection, documents)
        await invalidate_collection(collection)
        return IngestResult.model_validate(summary.as_dict())

    @app.delete("/v1/collections/{collection}", responses=errors(*CLIENT_AUTH, *RETRIEVAL, 400, 404))
    async def delete_collection(collection: str = collection_name, source: str | None = None,
                                _: str = Depends(auth)) -> DeleteResult:
        removed = await retrieval_call(retriever().delete, collection, source)
        await invalidate_collection(collection)
        return DeleteResult(collection=collection, source=source, removed_chunks=removed)

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        refresh_gauges()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/semantic-cache/false-hit", responses=errors(*CLIENT_AUTH, *JSON_BODY, 404))
    async def report_false_hit(body: FalseHitReport, tenant: str = Depends(auth)) -> FalseHitResult:
        """A client says a cached answer was wrong (entry_id from the hit's blendgate.semantic_cache): it is
        counted and the entry invalidated. Only the tenant the entry belongs to may report it."""
        entry_id = body.entry_id
        cache = chat_cache.cache
        owner = cache.category_of(entry_id) if cache is not None else None
        if owner is None or owner[0] != tenant:
            raise GatewayError(404, f"no live semantic-cache entry {entry_id} of yours", code="entry_not_found")
        metrics.false_hit(owner[1], tenant)
        return FalseHitResult(invalidated=await cache.invalidate(entry_id=entry_id, tenant=tenant))

    @app.get("/healthz", response_model=Health,
             responses={503: {"model": Health, "description": "Not ready: still loading, degraded or failed"}})
    async def healthz():
        """200 "ready" when every model, the collections and the semantic cache are ready (a cache whose store
        is down is "degraded" but serves without it); else 503 with "loading", "failed" or "degraded"."""
        models = {name: backend.status() for name, backend in backends.items()}
        retrieval = {"state": "ready"} if rag.retriever is not None else \
            {"state": "failed", "error": rag.retriever_error} if rag.retriever_error else {"state": "loading"}
        cache = chat_cache.cache
        semantic = {"state": "disabled"} if not settings.semantic_cache.enabled else \
            {"state": "loading"} if cache is None else \
            {"state": "ready" if cache.available else "degraded", "store": cache.store.kind,
             "entries": len(cache.index), **({"error": cache.down_reason} if not cache.available else {})}
        states = {m["state"] for m in models.values()} | {retrieval["state"]} | \
            ({"loading"} if semantic["state"] == "loading" else set())
        status = "ready" if states == {"ready"} else "failed" if "failed" in states else \
            "degraded" if "unavailable" in states else "loading"
        health = Health(status=status, models=models, retrieval=retrieval, semantic_cache=semantic)
        return JSONResponse(health.model_dump(), status_code=200 if status == "ready" else 503)

    return app

