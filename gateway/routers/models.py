"""GET /v1/models and /v1/models/{model}: the models this gateway serves, in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..backends.local import LocalBackend
from ..backends.sglang import SglangBackend
from ..openapi import CLIENT_AUTH, errors
from ..responses import ModelCard, ModelList
from ..state import AppState
from .deps import app_state, tenant

router = APIRouter()


def model_card(state: AppState, name: str) -> ModelCard:
    backend = state.backends[name]
    owner = "blendgate" if isinstance(backend, LocalBackend) else "sglang" if isinstance(backend, SglangBackend) \
        else backend.config.litellm_model.split("/")[0]
    return ModelCard(id=name, owned_by=owner)


@router.get("/v1/models", responses=errors(*CLIENT_AUTH))
async def list_models(_: str = Depends(tenant), state: AppState = Depends(app_state)) -> ModelList:
    return ModelList(data=[model_card(state, name) for name in state.backends])


@router.get("/v1/models/{model:path}", responses=errors(*CLIENT_AUTH, 404))
async def get_model(model: str, _: str = Depends(tenant), state: AppState = Depends(app_state)) -> ModelCard:
    state.chat.backend_for(model)
    return model_card(state, model)
