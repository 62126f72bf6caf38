"""Every error the gateway returns uses OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("blendgate.gateway")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (what the OpenAPI document declares for each 4xx/5xx)."""

    error: ErrorDetail


class GatewayError(Exception):
    """An error with its HTTP status, raised anywhere and rendered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def error_response(error: GatewayError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; ('path', 'collection') -> 'collection'."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "path", "query", "header") else list(loc)
    # Discriminated/union branches add the branch name to the location; it means nothing to a client.
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or "function-" in part or part in {"str", "list[str]"}):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or None


# Validation errors whose pydantic type is one of the gateway's own error codes keep it as the code.
OWN_CODES = frozenset({"nothing_to_ingest"})


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> GatewayError:
    """The gateway's error for a request FastAPI could not validate. `content_type`: the request's header; a
    body FastAPI did not parse as JSON because of it (sent as text or a form) is told so."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        return GatewayError(400, "The request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "")),
                            code="invalid_json")
    param = _loc_to_param(tuple(first["loc"]))
    if first["type"] == "missing" and param is None:
        return GatewayError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    if first["type"] == "missing":
        return GatewayError(400, f"Missing required parameter: '{param}'.", code="missing_required_parameter",
                            param=param)
    if first["type"] == "model_attributes_type" or (param is None and first["type"].endswith("_type")):
        if content_type is not None and not _is_json(content_type):
            return GatewayError(400, "The request body must be a JSON object sent with Content-Type: "
                                     f"application/json; this one was sent as {content_type!r}.",
                                code="invalid_json")
        return GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    if first["type"] == "string_pattern_mismatch" and tuple(first["loc"]) == ("path", "collection"):
        return GatewayError(400, f"Invalid collection name {first.get('input')!r}: letters, digits, '_', '-', '.', "
                                 "starting with a letter or digit, up to 64 characters",
                            code="invalid_collection_name", param="collection")
    message = first["msg"].removeprefix("Value error, ")
    detail = f"Invalid value for '{param}': {message}" if param else message
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    code = first["type"] if first["type"] in OWN_CODES else "invalid_value"
    return GatewayError(400, detail, code=code, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc, request.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, GatewayError):  # FastAPI wraps errors raised while it reads the body
            return error_response(exc.__cause__)
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(GatewayError(exc.status_code, message, code=None), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(GatewayError(500, f"Internal error: {type(exc).__name__}", type="server_error"))
