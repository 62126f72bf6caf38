"""The OpenAPI document (/openapi.json) made to say what the gateway really answers.

Each route declares the error statuses it can give, all with OpenAI's error body (errors.ErrorResponse),
through `errors()`. FastAPI adds a 422 "HTTPValidationError" to every route with parameters or a body; the
gateway answers validation errors with 400 in OpenAI's shape instead (errors.validation_error), so
`install_openapi` takes the 422 and its schemas out of the document. tests/e2e/test_openapi.py runs schemathesis
against a live gateway to keep the two in step.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .errors import ErrorResponse

_MEANING = {
    400: "Invalid request: malformed JSON, a missing, mistyped or out-of-range field or parameter",
    401: "Missing or wrong key (API key for /v1, admin key for /admin/api)",
    403: "The admin API is turned off (no admin_key configured)",
    404: "No such model, collection, source or entry",
    409: "The collection was built with another embedder or tokenizer",
    413: "Body over max_request_bytes, or a prompt longer than the model's context",
    429: "The upstream provider is rate limiting",
    502: "The upstream provider or SGLang worker failed or answered something unusable",
    503: "Still loading, overloaded, or the part asked for (retrieval, semantic cache) is unavailable",
    504: "The upstream provider or SGLang worker did not answer in time",
}

# Status sets shared by many routes.
CLIENT_AUTH = (401,)            # /v1 routes: a key is needed once api_keys are configured
ADMIN_AUTH = (401, 403)          # /admin/api routes
JSON_BODY = (400, 413)           # routes that read a JSON body
RETRIEVAL = (503,)               # routes that need the retriever (503 while it loads)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with OpenAI's error body and what it means here."""
    return {status: {"model": ErrorResponse, "description": _MEANING[status]} for status in sorted(set(statuses))}


def install_openapi(app: FastAPI) -> None:
    """Serve the document without FastAPI's 422 responses and their schemas (the gateway never answers 422)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # FastAPI's documented way to customise the document
