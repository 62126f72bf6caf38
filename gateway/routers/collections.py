"""Document collections and retrieval: POST /v1/retrieve, GET /v1/collections, POST
/v1/collections/{collection}/documents and DELETE /v1/collections/{collection}. Changing a collection
invalidates the semantic cache's answers built on it."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Depends, Path

from ...retriever.loaders import SourceDocument
from ...retriever.service import COLLECTION_NAME, RetrievalError
from ..openapi import CLIENT_AUTH, JSON_BODY, RETRIEVAL, errors
from ..rag import as_gateway_error
from ..rag_report import version_fields
from ..responses import CollectionList, DeleteResult, IngestResult, RetrieveResponse
from ..schemas import IngestRequest, RetrieveRequest
from ..state import AppState
from .deps import app_state, tenant

log = logging.getLogger("blendgate.gateway")

router = APIRouter()

# A collection in a path: the retriever's naming rule, declared so the document says which names exist.
collection_name = Path(pattern=COLLECTION_NAME.pattern, description="letters, digits, '_', '-', '.'; "
                                                                     "at most 64 characters")


async def retrieval_call(function, *args):
    """A retriever call off the event loop, its RetrievalError as the GatewayError it stands for."""
    try:
        return await asyncio.to_thread(function, *args)
    except RetrievalError as exc:
        raise as_gateway_error(exc) from exc


async def invalidate_collection(state: AppState, collection: str) -> None:
    # Answers built on the old documents must go; entries also carry the collection's version in their
    # key, which covers ingests by the CLI in another process.
    cache = state.semantic_cache.value
    if cache is not None:
        removed = await cache.invalidate(collection=collection)
        if removed:
            log.info("semantic cache: %d entries of collection %s invalidated", removed, collection)


@router.post("/v1/retrieve", responses=errors(*CLIENT_AUTH, *JSON_BODY, *RETRIEVAL, 404, 409))
async def retrieve(request: RetrieveRequest, _: str = Depends(tenant),
                   state: AppState = Depends(app_state)) -> RetrieveResponse:
    retriever = state.rag.require_retriever()
    with state.metrics.retrieval.labels("retrieve").time():
        chunks = await retrieval_call(retriever.search, request.collection, request.query, request.top_k)
    return RetrieveResponse(collection=request.collection,
                            **version_fields(retriever.collection_version(request.collection)),
                            data=[{**c.citation(), "text": c.text, "token_count": c.token_count} for c in chunks])


@router.get("/v1/collections", responses=errors(*CLIENT_AUTH, *RETRIEVAL))
async def list_collections(_: str = Depends(tenant), state: AppState = Depends(app_state)) -> CollectionList:
    return CollectionList(data=await retrieval_call(state.rag.require_retriever().collections))


@router.post("/v1/collections/{collection}/documents", responses=errors(*CLIENT_AUTH, *JSON_BODY, *RETRIEVAL, 409))
async def ingest_documents(request: IngestRequest, collection: str = collection_name,
                           _: str = Depends(tenant), state: AppState = Depends(app_state)) -> IngestResult:
    documents = [SourceDocument(d.source or f"api#{d.id or i}", d.text) for i, d in enumerate(request.documents)]
    summary = await retrieval_call(state.rag.require_retriever().ingest_documents, collection, documents)
    await invalidate_collection(state, collection)
    return IngestResult.model_validate(summary.as_dict())


@router.delete("/v1/collections/{collection}", responses=errors(*CLIENT_AUTH, *RETRIEVAL, 400, 404))
async def delete_collection(collection: str = collection_name, source: str | None = None,
                            _: str = Depends(tenant), state: AppState = Depends(app_state)) -> DeleteResult:
    removed = await retrieval_call(state.rag.require_retriever().delete, collection, source)
    await invalidate_collection(state, collection)
    return DeleteResult(collection=collection, source=source, removed_chunks=removed)
