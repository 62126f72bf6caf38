"""The application state: every object the routes use, built whole by `build_state(settings)` in the app's
lifespan (gateway/app.py) and handed to the routes through FastAPI dependencies (gateway/routers/deps.py).

Nothing is assigned after construction. What loads in the background after the port opens (the document
collections' retriever, then the semantic cache, which embeds with the retriever's embedder) is held in
Loadable parts (gateway/loadable.py), so /healthz answers "loading" at once; `start` begins that loading and
`close` ends everything.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry

from ..retriever.embedder import EmbedderError
from ..retriever.service import CorruptIndexError, Retriever
from ..semcache.cache import SemanticCache
from ..semcache.metrics import SemanticCacheMetrics, TenantLabel
from ..semcache.policy import LoadMonitor
from .answer_cache import AnswerCache, build_semantic_cache, model_fingerprints
from .auth import AdminAuth, ApiKeyAuth
from .backends.base import ChatBackend
from .backends.local import LocalBackend
from .backends.sglang import SglangBackend
from .backends.upstream import LitellmBackend
from .chat import ChatService
from .config import LocalModelConfig, Settings, SglangModelConfig
from .lifecycle import Lifecycle
from .loadable import Loadable
from .metrics.admin_stats import snapshot
from .metrics.live import LiveStateCollector
from .metrics.series import GatewayMetrics
from .rag import RagPlanner, build_retriever
from .stats_history import StatsHistory

log = logging.getLogger("blendgate.gateway")

STATE_KEY = "gateway"  # the AppState's key in the lifespan state (request.state.gateway)


def build_backends(settings: Settings) -> dict[str, ChatBackend]:
    """One backend per configured model, by name; none started yet."""
    backends: dict[str, ChatBackend] = {}
    for model in settings.models:
        if isinstance(model, LocalModelConfig):
            backends[model.name] = LocalBackend(model, cache_dir=settings.cache_dir,
                                                max_running=settings.max_running_requests,
                                                max_waiting=settings.max_waiting_requests,
                                                chunk_cache=settings.chunk_cache,
                                                chunk_tokens=settings.retrieval.chunk_tokens)
        elif isinstance(model, SglangModelConfig):
            backends[model.name] = SglangBackend(model, cache_dir=settings.cache_dir)
        else:
            backends[model.name] = LitellmBackend(model)
    return backends


def chunk_stores(backends: dict[str, ChatBackend]) -> dict[str, dict]:
    """Each local model's chunk-cache store report (only models whose store exists)."""
    return {name: b.store.report() for name, b in backends.items()
            if isinstance(b, LocalBackend) and b.store is not None}


def _default_temperature(settings: Settings) -> Callable[[str], float | None]:
    def default(model: str) -> float | None:
        config = settings.model(model)
        # A litellm model's default is the provider's; a request that sets none counts as cacheable.
        return config.sampling_defaults.temperature if isinstance(config, (LocalModelConfig, SglangModelConfig)) \
            else None
    return default


@dataclass(frozen=True)
class AppState:
    """What the routes use. `retriever` and `semantic_cache` load in the background (`start`); the semantic
    cache stays loading for ever when it is disabled (settings.semantic_cache.enabled)."""

    settings: Settings
    registry: CollectorRegistry  # everything /metrics serves
    metrics: GatewayMetrics
    tenant_label: TenantLabel
    backends: dict[str, ChatBackend]
    load: LoadMonitor
    retriever: Loadable[Retriever]
    semantic_cache: Loadable[SemanticCache]
    rag: RagPlanner
    answer_cache: AnswerCache
    chat: ChatService
    auth: ApiKeyAuth
    admin: AdminAuth
    history: StatsHistory  # the admin charts' recent past
    lifecycle: Lifecycle  # draining or not (cli.serve's signals -> /healthz)

    async def start(self, on_fatal: Callable[[], None]) -> asyncio.Task:
        """Start the backends and the background loading; returns at once, with the loading task (for
        `close`). `on_fatal` is called when a part the gateway cannot serve without fails to load (the
        document collections)."""
        await asyncio.gather(*(backend.start() for backend in self.backends.values()))
        loading = asyncio.create_task(self._open_collections_and_cache(on_fatal), name="open collections and cache")

        def fatal_if_failed(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("start-up failed", exc_info=task.exception())
                on_fatal()

        loading.add_done_callback(fatal_if_failed)
        self.history.start()
        return loading

    async def _open_collections_and_cache(self, on_fatal: Callable[[], None]) -> None:
        """The document collections, then the semantic cache (which embeds with the retriever's embedder, so
        a RAG miss embeds its question once). A collection that cannot be opened (a corrupt index) is fatal:
        it is logged, naming the file, and `on_fatal` stops the gateway."""
        settings = self.settings
        try:
            retriever = await asyncio.to_thread(build_retriever, settings)
            # The indexes first: a collection that cannot be opened stops the gateway before the embedder loads.
            await asyncio.to_thread(retriever.load_all)
            await asyncio.to_thread(lambda: retriever.embedder)
        except (CorruptIndexError, EmbedderError, sqlite3.DatabaseError) as exc:
            log.error("cannot open the document collections: %s", exc)
            self.retriever.fail(str(exc))
            on_fatal()
            return
        self.retriever.set(retriever)
        log.info("retrieval ready: %d collections in %s", len(retriever.collections()), settings.retrieval.data_dir)
        if settings.semantic_cache.enabled:
            semantic = build_semantic_cache(settings.semantic_cache, retriever.embedder,
                                            SemanticCacheMetrics(self.registry, self.tenant_label), self.load)
            try:
                await semantic.start()
            except asyncio.CancelledError:  # shut down while starting
                await semantic.close()
                raise
            self.semantic_cache.set(semantic)

    async def close(self, loading: asyncio.Task) -> None:
        """Stop the background loading (`start`'s task), the admin history, the semantic cache and the backends."""
        await self.history.stop()
        await self.chat.audits.close()
        loading.cancel()
        await asyncio.gather(loading, return_exceptions=True)
        cache = self.semantic_cache.value
        if cache is not None:
            await cache.close()
        await asyncio.gather(*(backend.close() for backend in self.backends.values()), return_exceptions=True)


def build_state(settings: Settings, lifecycle: Lifecycle | None = None) -> AppState:
    """The whole application state for these settings, nothing started or loaded yet (AppState.start);
    `lifecycle`: the process's run state, shared with whoever handles its signals."""
    backends = build_backends(settings)
    registry = CollectorRegistry()
    tenant_label = TenantLabel(settings.metrics.tenant_label)
    metrics = GatewayMetrics(registry, tenant_label)
    load = LoadMonitor(settings.semantic_cache.load)
    retriever: Loadable[Retriever] = Loadable()
    semantic: Loadable[SemanticCache] = Loadable()
    rag = RagPlanner(retriever, settings.retrieval)
    answer_cache = AnswerCache(settings.semantic_cache, _default_temperature(settings),
                               settings.retrieval.system_prompt, model_fingerprints(settings), retriever=retriever,
                               semantic=semantic)
    chat = ChatService(backends, rag, {m.name: m.rag for m in settings.models}, answer_cache, load, metrics)
    registry.register(LiveStateCollector(lambda: chunk_stores(backends), lambda: dict(chat.in_flight)))
    return AppState(settings=settings, registry=registry, metrics=metrics, tenant_label=tenant_label,
                    backends=backends, load=load, retriever=retriever, semantic_cache=semantic, rag=rag,
                    answer_cache=answer_cache, chat=chat, auth=ApiKeyAuth(settings.tenants_by_key()),
                    admin=AdminAuth(settings.resolved_admin_key()),
                    history=StatsHistory(lambda: snapshot(metrics)), lifecycle=lifecycle or Lifecycle())
