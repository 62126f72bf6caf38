"""Typed bodies of the gateway's own answers (models, retrieval, collections, health, false-hit reports), as
the OpenAPI document declares them. Chat completions are shaped in chat.py; errors in errors.py.

Objects that other parts fill with details of their own (a model's load state, an ingest summary) allow
extra fields: the document names the fields every answer has, not every detail.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ModelCard(BaseModel):
    """One model, as OpenAI's `GET /v1/models/{model}` gives it."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RetrievedChunk(BaseModel):
    """A chunk found by `/v1/retrieve`; `score` is the cosine similarity to the query."""

    id: str
    source: str
    position: int
    score: float
    text: str
    token_count: int


class RetrieveResponse(BaseModel):
    object: Literal["list"] = "list"
    collection: str
    version: int | None  # the collection's version at the time of the search (bumped by every change)
    generation: str | None  # the collection's id since it was created (a re-created collection has another)
    data: list[RetrievedChunk]


class CollectionInfo(_Open):
    name: str
    version: int | str
    files: int
    chunks: int


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]


class IngestResult(_Open):
    """What an ingest did: sources added or replaced (`files`), unchanged, chunks written and removed."""

    collection: str
    files: int
    unchanged: int
    chunks: int
    removed_chunks: int
    seconds: float


class DeleteResult(BaseModel):
    collection: str
    source: str | None
    deleted: Literal[True] = True
    removed_chunks: int


class FalseHitResult(BaseModel):
    reported: Literal[True] = True
    invalidated: int  # entries removed (0 when it expired meanwhile)


class ComponentState(_Open):
    """A part of the gateway and its state ("ready", "loading", "failed", "degraded", "disabled", ...)."""

    state: str


class Health(BaseModel):
    """`GET /healthz`: 200 when every model is ready, else 503 with the same body."""

    status: Literal["ready", "loading", "degraded", "failed", "draining"]
    models: dict[str, ComponentState]
    retrieval: ComponentState
    semantic_cache: ComponentState
