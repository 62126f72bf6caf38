"""Operators' side of the gateway: the admin JSON API (docs/admin-api.md) behind the admin key, and the admin
web UI (web/static, served as files: no build step, nothing fetched from elsewhere at run time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..backends.local import LocalBackend
from ..errors import GatewayError
from ..metrics.admin_stats import document_chunk_lookups, semantic_categories, snapshot
from ..openapi import ADMIN_AUTH, JSON_BODY, errors
from ..schemas import InvalidateRequest
from ..state import AppState, chunk_stores
from ..stats_history import SAMPLE_INTERVAL_S
from .deps import admin, app_state, semantic_cache_of

WEB_STATIC = Path(__file__).resolve().parent.parent.parent / "web" / "static"

api = APIRouter(prefix="/admin/api", dependencies=[Depends(admin)], responses=errors(*ADMIN_AUTH))


@api.get("/stats")
async def stats(state: AppState = Depends(app_state)):
    cache = state.semantic_cache.value
    return snapshot(state.metrics, cache.store.kind if cache is not None else None)


@api.get("/stats/history")
async def stats_history(state: AppState = Depends(app_state)):
    """The overview's chart fields, sampled every SAMPLE_INTERVAL_S seconds over the last ten minutes."""
    return {"object": "list", "interval_s": SAMPLE_INTERVAL_S, "data": state.history.recent()}


@api.get("/semantic-cache", responses=errors(503))
async def semantic_cache_stats(state: AppState = Depends(app_state)):
    cache = semantic_cache_of(state)
    return {**cache.stats(), "categories": semantic_categories(state.metrics),
            "policy": cache.effective_policies(list(state.backends))}


@api.get("/semantic-cache/entries", responses=errors(400, 503))
async def semantic_cache_entries(search: str | None = Query(None, max_length=500),
                                 category: str | None = None, tenant: str | None = None,
                                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=200),
                                 state: AppState = Depends(app_state)):
    return await semantic_cache_of(state).browse(search=search, category=category, tenant=tenant, offset=offset,
                                                 limit=limit)


@api.delete("/semantic-cache/entries/{entry_id}", responses=errors(404, 503))
async def semantic_cache_delete(entry_id: str, state: AppState = Depends(app_state)):
    removed = await semantic_cache_of(state).invalidate(entry_id=entry_id)
    if not removed:
        raise GatewayError(404, f"no live semantic-cache entry {entry_id}", code="entry_not_found")
    return {"invalidated": removed}


@api.post("/semantic-cache/invalidate", responses=errors(*JSON_BODY, 503))
async def semantic_cache_invalidate(body: InvalidateRequest, state: AppState = Depends(app_state)):
    return {"invalidated": await semantic_cache_of(state).invalidate(**body.selectors())}


@api.get("/chunk-cache")
async def chunk_cache(state: AppState = Depends(app_state)):
    lookups = document_chunk_lookups(state.metrics)
    backends = state.backends
    return {"models": {name: {**report, **_contents(backends[name]),
                              "prefill_costs": backends[name].prefill_costs_view(),
                              "document_chunks": lookups.get(name, {"lookups": 0, "hits": 0, "hit_rate": None})}
                       for name, report in chunk_stores(backends).items()}}


@api.get("/config")
async def config(state: AppState = Depends(app_state)):
    return state.settings.redacted()


page = APIRouter()


@page.get("/admin", include_in_schema=False)
async def admin_page():
    return FileResponse(WEB_STATIC / "index.html", headers={"cache-control": "no-cache"})


def mount_admin_ui(app: FastAPI) -> None:
    """The admin UI's files under /admin/static."""
    if WEB_STATIC.is_dir():
        app.mount("/admin/static", StaticFiles(directory=WEB_STATIC), name="admin-static")


def _contents(backend: LocalBackend, top: int = 10) -> dict[str, Any]:
    """The chunks hit most, and what the store holds per collection (chunks the gateway placed in prompts;
    "(inline)" for documents sent with a request, "(unknown)" for entries from before this process)."""
    held = backend.store.entries() if backend.store is not None else []
    by_collection: dict[str, dict[str, int]] = {}
    for entry in held:
        origin = backend.chunk_origins.get(entry["chunk"])
        if origin is not None:
            entry.update(collection=origin.collection, id=origin.id, source=origin.source)
        else:
            entry.update(collection=None, id=None, source=None)
        name = (origin.collection or "(inline)") if origin is not None else "(unknown)"
        totals = by_collection.setdefault(name, {"chunks": 0, "bytes": 0, "hits": 0})
        totals["chunks"] += 1
        totals["bytes"] += entry["bytes"]
        totals["hits"] += entry["hits"]
    return {"top_chunks": sorted(held, key=lambda e: e["hits"], reverse=True)[:top], "collections": by_collection}
