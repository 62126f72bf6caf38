"""Operators' side of the gateway: the admin JSON API (docs/admin-api.md) behind the admin key, and the admin
web UI (web/static, served as files: no build step, nothing fetched from elsewhere at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .answer_cache import AnswerCache
from .auth import AdminAuth
from .backends.base import ChatBackend
from .backends.local import LocalBackend
from .config import Settings
from .errors import GatewayError
from .metrics import GatewayMetrics, Samples, semantic_categories, snapshot
from .openapi import ADMIN_AUTH, JSON_BODY, errors
from .schemas import InvalidateRequest
from .stats_history import SAMPLE_INTERVAL_S, StatsHistory

WEB_STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


def chunk_stores(backends: dict[str, ChatBackend]) -> dict[str, Any]:
    """Each local model's chunk-cache store report (only models whose store exists)."""
    return {name: b.store.report() for name, b in backends.items()
            if isinstance(b, LocalBackend) and b.store is not None}


def install_admin(app: FastAPI, *, settings: Settings, admin: AdminAuth, metrics: GatewayMetrics,
                  chat_cache: AnswerCache, backends: dict[str, ChatBackend], history: StatsHistory,
                  refresh_gauges: Callable[[], None]) -> None:
    api = APIRouter(prefix="/admin/api", dependencies=[Depends(admin)], responses=errors(*ADMIN_AUTH))

    def semantic_cache():
        if chat_cache.cache is None:
            raise GatewayError(503, "the semantic cache is disabled or still loading", code="cache_unavailable")
        return chat_cache.cache

    @api.get("/stats")
    async def stats():
        refresh_gauges()
        return snapshot(metrics, chat_cache.cache.store.kind if chat_cache.cache is not None else None)

    @api.get("/stats/history")
    async def stats_history():
        """The overview's chart fields, sampled every SAMPLE_INTERVAL_S seconds over the last ten minutes."""
        return {"object": "list", "interval_s": SAMPLE_INTERVAL_S, "data": history.recent()}

    @api.get("/semantic-cache", responses=errors(503))
    async def semantic_cache_stats():
        cache = semantic_cache()
        refresh_gauges()
        return {**cache.stats(), "categories": semantic_categories(metrics),
                "policy": cache.effective_policies(list(backends))}

    @api.get("/semantic-cache/entries", responses=errors(400, 503))
    async def semantic_cache_entries(search: str | None = Query(None, max_length=500),
                                     category: str | None = None, tenant: str | None = None,
                                     offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=200)):
        return await semantic_cache().browse(search=search, category=category, tenant=tenant, offset=offset,
                                             limit=limit)

    @api.delete("/semantic-cache/entries/{entry_id}", responses=errors(404, 503))
    async def semantic_cache_delete(entry_id: str):
        removed = await semantic_cache().invalidate(entry_id=entry_id)
        if not removed:
            raise GatewayError(404, f"no live semantic-cache entry {entry_id}", code="entry_not_found")
        return {"invalidated": removed}

    @api.post("/semantic-cache/invalidate", responses=errors(*JSON_BODY, 503))
    async def semantic_cache_invalidate(body: InvalidateRequest):
        return {"invalidated": await semantic_cache().invalidate(**body.selectors())}

    @api.get("/chunk-cache")
    async def chunk_cache():
        lookups = _document_chunk_lookups(metrics)
        return {"models": {name: {**report, **_contents(backends[name]),
                                  "document_chunks": lookups.get(name, {"lookups": 0, "hits": 0, "hit_rate": None})}
                           for name, report in chunk_stores(backends).items()}}

    @api.get("/config")
    async def config():
        return settings.redacted()

    app.include_router(api)

    @app.get("/admin", include_in_schema=False)
    async def admin_page():
        return FileResponse(WEB_STATIC / "index.html", headers={"cache-control": "no-cache"})

    if WEB_STATIC.is_dir():
        app.mount("/admin/static", StaticFiles(directory=WEB_STATIC), name="admin-static")


def _document_chunk_lookups(metrics: GatewayMetrics) -> dict[str, dict[str, Any]]:
    """Per model, the chunks of RAG prompts found in the chunk-cache: the figure the overview's chunk hit rate
    sums over models (the store's own tier counters also count the system prompt's KV)."""
    s = Samples(metrics.registry)
    lookups = s.by("blendgate_chunk_cache_lookups_total", "model")
    hits = s.by("blendgate_chunk_cache_lookups_total", "model", result="hit")
    return {model: {"lookups": int(n), "hits": int(hits.get(model, 0)),
                    "hit_rate": hits.get(model, 0) / n if n else None} for model, n in lookups.items()}


def _contents(backend: LocalBackend, top: int = 10) -> dict[str, Any]:
    """The chunks hit most, and what the store holds per collection (chunks the gateway placed in prompts;
    "(inline)" for documents sent with a request, "(unknown)" for entries from before this process)."""
    held = backend.store.entries() if backend.store is not None else []
    by_collection: dict[str, dict[str, int]] = {}
    for entry in held:
        origin = backend.chunk_origins.get(entry["chunk"], {})
        entry.update(collection=origin.get("collection"), id=origin.get("id"), source=origin.get("source"))
        name = origin.get("collection") or ("(inline)" if origin else "(unknown)")
        totals = by_collection.setdefault(name, {"chunks": 0, "bytes": 0, "hits": 0})
        totals["chunks"] += 1
        totals["bytes"] += entry["bytes"]
        totals["hits"] += entry["hits"]
    return {"top_chunks": sorted(held, key=lambda e: e["hits"], reverse=True)[:top], "collections": by_collection}
