"""The gateway's HTTP application: settings, the lifespan that builds and starts the application state
(gateway/state.py), middleware, the routers of gateway/routers/ and the error handlers."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import FastAPI
from prometheus_client import Counter

from . import __version__
from .config import Settings
from .errors import install_error_handlers
from .lifecycle import Lifecycle
from .limits import BodySizeLimit
from .metrics.middleware import RequestCounter
from .openapi import install_openapi
from .routers import admin, chat, collections, health, models, semantic_cache
from .state import STATE_KEY, build_state


def create_app(settings: Settings, on_fatal: Callable[[], None], lifecycle: Lifecycle | None = None) -> FastAPI:
    """The gateway. `on_fatal` is called when a part it cannot serve without fails to load in the background
    (the document collections): the caller stops the server and exits non-zero. `lifecycle`: the process's run
    state, which the caller's signal handling sets draining (gateway/lifecycle.py)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # Nothing here waits for loading, so the port opens at once: models, collections and the semantic
        # cache load in the background, and /healthz answers 503 "loading" until all are ready.
        state = build_state(settings, lifecycle)
        loading = await state.start(on_fatal)
        yield {STATE_KEY: state}
        await state.close(loading)

    app = FastAPI(title="blendgate", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestCounter, counter=_request_counter)
    app.include_router(admin.api)
    app.include_router(admin.page)
    admin.mount_admin_ui(app)
    for router in (chat.router, models.router, collections.router, health.router, semantic_cache.router):
        app.include_router(router)
    return app


def _request_counter(state: Mapping[str, Any]) -> Counter:
    """The request counter of the lifespan state's AppState (for the RequestCounter middleware)."""
    return state[STATE_KEY].metrics.requests
