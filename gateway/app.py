"""The gateway's HTTP application: routes, start-up and shutdown of the backends."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from . import __version__
from .auth import ApiKeyAuth
from .backends.base import ChatBackend
from .backends.local import LocalBackend
from .backends.upstream import LitellmBackend
from .chat import ChatService
from .config import LocalModelConfig, Settings
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")


def build_backends(settings: Settings) -> dict[str, ChatBackend]:
    backends: dict[str, ChatBackend] = {}
    for model in settings.models:
        if isinstance(model, LocalModelConfig):
            backends[model.name] = LocalBackend(model, cache_dir=settings.cache_dir,
                                                max_running=settings.max_running_requests,
                                                max_waiting=settings.max_waiting_requests)
        else:
            backends[model.name] = LitellmBackend(model)
    return backends


def create_app(settings: Settings) -> FastAPI:
    backends = build_backends(settings)
    chat = ChatService(backends)
    auth = ApiKeyAuth(settings.tenants_by_key())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Local models load in the background: /healthz answers "loading" meanwhile.
        await asyncio.gather(*(backend.start() for backend in backends.values()))
        yield
        await asyncio.gather(*(backend.close() for backend in backends.values()), return_exceptions=True)

    app = FastAPI(title="blendgate", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.state.backends = backends

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, tenant: str = Depends(auth)):
        return await chat.handle(request, tenant)

    def model_card(name: str) -> dict:
        backend = backends[name]
        owner = "blendgate" if isinstance(backend, LocalBackend) else backend.config.litellm_model.split("/")[0]
        return {"id": name, "object": "model", "created": 0, "owned_by": owner}

    @app.get("/v1/models")
    async def list_models(_: str = Depends(auth)):
        return {"object": "list", "data": [model_card(name) for name in backends]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, _: str = Depends(auth)):
        chat.backend_for(model)
        return model_card(model)

    @app.get("/healthz")
    async def healthz():
        models = {name: backend.status() for name, backend in backends.items()}
        states = {m["state"] for m in models.values()}
        status = "ready" if states == {"ready"} else "failed" if "failed" in states else "loading"
        return JSONResponse({"status": status, "models": models}, status_code=200 if status == "ready" else 503)

    return app

