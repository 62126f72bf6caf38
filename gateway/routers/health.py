"""GET /healthz (readiness of every model, the collections and the semantic cache) and GET /metrics
(Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..responses import Health
from ..state import AppState
from .deps import app_state

router = APIRouter()


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def prometheus_metrics(state: AppState = Depends(app_state)):
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", response_model=Health,
            responses={503: {"model": Health, "description": "Not ready: still loading, degraded, failed or draining"}})
async def healthz(state: AppState = Depends(app_state)):
    """200 "ready" when every model, the collections and the semantic cache are ready (a cache whose store
    is down is "degraded" but serves without it); else 503 with "loading", "failed", "degraded" or, once the
    process was told to stop (SIGTERM), "draining" (gateway/lifecycle.py)."""
    models = {name: backend.status() for name, backend in state.backends.items()}
    retrieval = {"state": state.retriever.state}
    if state.retriever.error is not None:
        retrieval["error"] = state.retriever.error
    cache = state.semantic_cache.value
    semantic = {"state": "disabled"} if not state.settings.semantic_cache.enabled else \
        {"state": "loading"} if cache is None else \
        {"state": "ready" if cache.available else "degraded", "store": cache.store.kind,
         "entries": len(cache.index), **({"error": cache.down_reason} if not cache.available else {})}
    states = {m["state"] for m in models.values()} | {retrieval["state"]} | \
        ({"loading"} if semantic["state"] == "loading" else set())
    status = "draining" if state.lifecycle.draining else "ready" if states == {"ready"} else \
        "failed" if "failed" in states else "degraded" if "unavailable" in states else "loading"
    health = Health(status=status, models=models, retrieval=retrieval, semantic_cache=semantic)
    return JSONResponse(health.model_dump(), status_code=200 if status == "ready" else 503)
