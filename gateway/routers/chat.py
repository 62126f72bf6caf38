"""POST /v1/chat/completions: OpenAI's chat endpoint, answered by the chat service (gateway/chat.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ..disconnect import ClientDisconnected, unless_disconnected
from ..openapi import CLIENT_AUTH, JSON_BODY, errors
from ..schemas import ChatCompletionRequest
from ..state import AppState
from .deps import app_state
from .deps import tenant as caller

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client left before the answer

router = APIRouter()


@router.post("/v1/chat/completions", responses=errors(*CLIENT_AUTH, *JSON_BODY, 404, 429, 502, 503, 504))
async def chat_completions(request: ChatCompletionRequest, raw: Request, tenant: str = Depends(caller),
                           state: AppState = Depends(app_state)):
    raw.state.model = request.model  # the request counter's model label
    try:
        return await unless_disconnected(raw.receive, state.chat.handle(request, tenant, raw.headers))
    except ClientDisconnected:
        # Nobody reads this; the request counter records it under nginx's "client closed request".
        return Response(status_code=CLIENT_CLOSED_REQUEST)
