"""FastAPI dependencies: the application state of the lifespan (`app_state`), the caller's tenant (`tenant`,
client API keys) and the operators' check (`admin`, the admin key)."""

from __future__ import annotations

from fastapi import Depends, Request

from ...semcache.cache import SemanticCache
from ..errors import GatewayError
from ..state import STATE_KEY, AppState


def app_state(request: Request) -> AppState:
    """The state build_state made in the lifespan (Starlette's lifespan state, copied into each request)."""
    return getattr(request.state, STATE_KEY)


async def tenant(request: Request, state: AppState = Depends(app_state)) -> str:
    """The caller's tenant from `Authorization: Bearer KEY` (auth.ApiKeyAuth); 401 for a missing or wrong
    key once keys are configured."""
    return await state.auth(request)


async def admin(request: Request, state: AppState = Depends(app_state)) -> None:
    """401 or 403 unless the request carries the admin key (auth.AdminAuth)."""
    await state.admin(request)


def semantic_cache_of(state: AppState) -> SemanticCache:
    """The semantic cache; GatewayError 503 `cache_unavailable` when it is disabled or still loading."""
    cache = state.semantic_cache.value
    if cache is None:
        raise GatewayError(503, "the semantic cache is disabled or still loading", code="cache_unavailable")
    return cache
