"""Refuses request bodies over the configured size before anything parses them."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import GatewayError, error_response


class BodySizeLimit:
    """ASGI middleware: 413 for a Content-Length over the limit, or a body that turns out larger."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"The request body is larger than the gateway's limit of {self.max_bytes} bytes.",
                            code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._too_large())(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # A body sent without Content-Length (chunked) is cut off here, once it passes the limit.
                    raise self._too_large()
            return message

        await self.app(scope, counted_receive, send)
