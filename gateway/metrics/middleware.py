"""ASGI middleware counting every HTTP request into GatewayMetrics.requests, by model, status and route."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from prometheus_client import Counter


def route_of(path: str) -> str:
    """A bounded route label for a request path (paths carry collection names and ids)."""
    for prefix, route in (("/v1/chat/completions", "chat"), ("/v1/retrieve", "retrieve"),
                          ("/v1/collections", "collections"), ("/v1/models", "models"),
                          ("/v1/semantic-cache", "semantic_cache"), ("/admin", "admin"), ("/metrics", "metrics"),
                          ("/healthz", "health")):
        if path.startswith(prefix):
            return route
    return "other"


class RequestCounter:
    """ASGI middleware: counts every HTTP request by model (set by the chat route in request.state), status
    and route once its response is over (a stream when it ends). `counter` finds the counter in the lifespan
    state, which the server copies into each request's scope["state"] (the application state is built in the
    lifespan, after the middleware)."""

    def __init__(self, app, counter: Callable[[Mapping[str, Any]], Counter]) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            state = scope.get("state") or {}
            self.counter(state).labels(state.get("model", ""), str(status), route_of(scope.get("path", ""))).inc()
