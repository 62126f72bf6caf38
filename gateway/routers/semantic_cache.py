"""POST /v1/semantic-cache/false-hit: clients report a cached answer that was wrong."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..errors import GatewayError
from ..openapi import CLIENT_AUTH, JSON_BODY, errors
from ..responses import FalseHitResult
from ..schemas import FalseHitReport
from ..state import AppState
from .deps import app_state
from .deps import tenant as caller

router = APIRouter()


@router.post("/v1/semantic-cache/false-hit", responses=errors(*CLIENT_AUTH, *JSON_BODY, 404))
async def report_false_hit(body: FalseHitReport, tenant: str = Depends(caller),
                           state: AppState = Depends(app_state)) -> FalseHitResult:
    """A client says a cached answer was wrong (entry_id from the hit's blendgate.semantic_cache): it is
    counted, the thresholds of its tenant and category learn from it (semcache/feedback.py: raised while the
    reported false share's upper bound exceeds the category's false-hit bound), and the entry is invalidated.
    Only the tenant the entry belongs to may report it."""
    entry_id = body.entry_id
    cache = state.semantic_cache.value
    owner = cache.category_of(entry_id) if cache is not None else None
    if owner is None or owner[0] != tenant:
        raise GatewayError(404, f"no live semantic-cache entry {entry_id} of yours", code="entry_not_found")
    state.metrics.false_hit(owner[1], tenant)
    cache.learn_false_hit(entry_id, tenant, owner[1])
    return FalseHitResult(invalidated=await cache.invalidate(entry_id=entry_id, tenant=tenant))
