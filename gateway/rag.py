"""Retrieval-augmented chat: which chunks a request gets (retrieved or inline), placed by the template of
rag_template.py."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..engine.weights import load_tokenizer
from ..retriever.chunking import chunk_id
from ..retriever.document_store import CollectionVersion
from ..retriever.service import RetrievalError, RetrievedChunk, Retriever, open_retriever
from .config import ModelRagConfig, RetrievalSettings, Settings
from .errors import GatewayError
from .rag_template import RagPrompt, rag_messages
from .schemas import ChatCompletionRequest, ChatMessage, Document


def build_retriever(settings: Settings) -> Retriever:
    retrieval = settings.retrieval
    tokenizer_model = settings.tokenizer_model()
    return open_retriever(
        retrieval.data_dir, lambda: load_tokenizer(tokenizer_model.path, settings.cache_dir),
        retrieval.embedder_path, chunk_tokens=retrieval.chunk_tokens, overlap_tokens=retrieval.chunk_overlap_tokens,
        approximate_threshold=retrieval.approximate_index_threshold, max_file_bytes=retrieval.max_file_bytes,
        nprobe=retrieval.ivf_nprobe)


def version_fields(version: CollectionVersion | None) -> dict:
    """A collection's version as answers report it: `version` (bumped by every change) and `generation` (the
    id of this collection since it was created; a collection deleted and created again has a new one)."""
    return {"version": None if version is None else version.number,
            "generation": None if version is None else version.generation}


def as_gateway_error(exc: RetrievalError) -> GatewayError:
    return GatewayError(exc.status, str(exc), code=exc.code)


def _question(request: ChatCompletionRequest) -> str:
    last = request.messages[-1]
    if last.role != "user":
        raise GatewayError(400, "with 'rag' or 'documents', the last message must be the user's question",
                           code="invalid_value", param="messages")
    question = last.text().strip()
    if not question:
        raise GatewayError(400, "the question (the last user message) is empty", code="invalid_value",
                           param="messages")
    return question


def rewrite_messages(request: ChatCompletionRequest, prompt: RagPrompt) -> list[ChatMessage]:
    """The request's messages with the chunks placed by the template."""
    history = [m.model_dump(exclude_none=True) for m in request.messages[:-1]]
    return [ChatMessage.model_validate(m) for m in rag_messages(history, prompt)]


class RagPlanner:
    """Decides and performs the retrieval a chat request asks for (or its model is configured for)."""

    def __init__(self, retriever: Retriever | None, settings: RetrievalSettings,
                 retriever_error: str | None = None) -> None:
        self.retriever = retriever
        self.system_prompt = settings.system_prompt
        self.max_documents = settings.max_inline_documents
        self.max_document_tokens = settings.max_inline_document_tokens
        self.retriever_error = retriever_error

    async def prepare(self, request: ChatCompletionRequest, model_rag: ModelRagConfig | None,
                      query_vector: np.ndarray | None = None) -> tuple[ChatCompletionRequest, dict | None]:
        """Returns the request to send on (rewritten when RAG applies) and the report for `blendgate.rag`.
        Building the prompt (hashing documents, rendering the template) runs off the event loop."""
        if request.documents is not None:
            chunks = await asyncio.to_thread(self._inline, request.documents)  # tokenising is CPU work
            prompt = RagPrompt(self.system_prompt, chunks, _question(request))
            report = {"collection": None, **version_fields(None), "chunks": [c.citation() for c in prompt.chunks]}
        elif request.rag is not None or model_rag is not None:
            options = request.rag or model_rag
            retriever = self.require_retriever()
            question = _question(request)
            started = time.perf_counter()
            try:
                chunks = await asyncio.to_thread(retriever.search, options.collection, question, options.top_k,
                                                query_vector)
            except RetrievalError as exc:
                raise as_gateway_error(exc) from exc
            prompt = RagPrompt(self.system_prompt, chunks, question)
            report = {"collection": options.collection,
                      **version_fields(retriever.collection_version(options.collection)), "chunks": [c.citation() for c in chunks],
                      "retrieval_ms": round((time.perf_counter() - started) * 1000, 2)}
        else:
            return request, None
        rewritten = request.model_copy(update={"messages": await asyncio.to_thread(rewrite_messages, request, prompt)})
        rewritten._rag_prompt = prompt  # the local engine places its segments; other backends read the messages
        return rewritten, report

    def require_retriever(self) -> Retriever:
        if self.retriever is None:
            raise GatewayError(503, f"retrieval is unavailable: {self.retriever_error or 'still loading'}",
                               code="retrieval_unavailable")
        return self.retriever

    def _inline(self, documents: list[str | Document]) -> list[RetrievedChunk]:
        """The request's inline documents as chunks, each with its token count (the retriever's tokenizer).
        Raises GatewayError: 400 for more than `max_inline_documents`, 413 for more than
        `max_inline_document_tokens` tokens in all (each limit named in the message)."""
        if len(documents) > self.max_documents:
            raise GatewayError(400, f"{len(documents)} inline documents are more than the {self.max_documents} "
                                    f"this gateway takes (retrieval.max_inline_documents)",
                               code="too_many_documents", param="documents")
        texts = [document if isinstance(document, str) else document.text for document in documents]
        counts = self.require_retriever().chunker.count_tokens(texts)
        if sum(counts) > self.max_document_tokens:
            raise GatewayError(413, f"the inline documents have {sum(counts)} tokens, more than the "
                                    f"{self.max_document_tokens} this gateway takes "
                                    f"(retrieval.max_inline_document_tokens)",
                               code="documents_too_long", param="documents")
        fingerprint = "inline"  # ids of inline documents only need to be stable, not shared with collections
        chunks = []
        for index, (document, text, count) in enumerate(zip(documents, texts, counts)):
            source = f"request#{index}" if isinstance(document, str) else (document.source or f"request#{index}")
            identifier = chunk_id(fingerprint, text) if isinstance(document, str) or not document.id else document.id
            chunks.append(RetrievedChunk(identifier, text, source, 0, 1.0, count))
        return chunks
