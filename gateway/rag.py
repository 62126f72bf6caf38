"""Retrieval-augmented chat: which collection applies to a request (retrieval_for), which chunks it gets
(retrieved or inline), placed by the template of rag_template.py; the outcome is a RagResult."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from ..retriever.chunking import chunk_id
from ..retriever.service import RetrievalError, RetrievedChunk, Retriever, open_retriever
from .config import ModelRagConfig, RetrievalSettings, Settings
from .errors import GatewayError
from .loadable import Loadable
from .rag_report import RagReport
from .rag_template import RagPrompt, rag_messages
from .schemas import ChatCompletionRequest, ChatMessage, Document, RagOptions


def build_retriever(settings: Settings) -> Retriever:
    retrieval = settings.retrieval
    tokenizer_model = settings.tokenizer_model()

    def tokenizer() -> object:  # imported here: `blendgate collections` and `delete` need no torch
        from ..engine.weights import load_tokenizer

        return load_tokenizer(tokenizer_model.path, settings.cache_dir)

    return open_retriever(
        retrieval.data_dir, tokenizer,
        retrieval.embedder_path, chunk_tokens=retrieval.chunk_tokens, overlap_tokens=retrieval.chunk_overlap_tokens,
        approximate_threshold=retrieval.approximate_index_threshold, max_file_bytes=retrieval.max_file_bytes,
        nprobe=retrieval.ivf_nprobe)


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


# What a request retrieves by: the collection and top_k, from the request or from its model's configuration.
Retrieval = RagOptions | ModelRagConfig


def retrieval_for(request: ChatCompletionRequest, model_rag: ModelRagConfig | None) -> Retrieval | None:
    """Which collection a chat request retrieves from, decided here only: none when it brings its own
    documents; else its `rag` options, else its model's configured RAG (ModelRagConfig), else none."""
    if request.documents is not None:
        return None
    return request.rag or model_rag


@dataclass(frozen=True)
class RagResult:
    """The RAG step's outcome for a chat request: the request with its messages rewritten by the template,
    the prompt's parts (for the backends that place chunks as segments) and the report for `blendgate.rag`."""

    request: ChatCompletionRequest
    prompt: RagPrompt
    report: RagReport


class RagPlanner:
    """Performs the retrieval a chat request asks for (or its model is configured for), or places its inline
    documents: the chunks of its RAG prompt."""

    def __init__(self, retriever: Loadable[Retriever], settings: RetrievalSettings) -> None:
        self.retriever = retriever
        self.system_prompt = settings.system_prompt
        self.max_documents = settings.max_inline_documents
        self.max_document_tokens = settings.max_inline_document_tokens

    async def prepare(self, request: ChatCompletionRequest, retrieval: Retrieval | None,
                      query_vector: np.ndarray | None = None) -> RagResult | None:
        """The RAG prompt of a request with inline documents, or retrieved by `retrieval` (retrieval_for);
        None when neither applies. `query_vector`: the question's embedding when the semantic cache made it
        already. Building the prompt (hashing documents, rendering the template) runs off the event loop.
        Raises GatewayError: 400 for a last message that is not a user's question, 503 while the collections
        load, and the retriever's errors (as_gateway_error)."""
        if request.documents is not None:
            chunks = await asyncio.to_thread(self._inline, request.documents)  # tokenising is CPU work
            prompt = RagPrompt(self.system_prompt, chunks, _question(request))
            report = RagReport(None, None, [c.citation() for c in prompt.chunks])
        elif retrieval is not None:
            retriever = self.require_retriever()
            question = _question(request)
            started = time.perf_counter()
            try:
                chunks = await asyncio.to_thread(retriever.search, retrieval.collection, question, retrieval.top_k,
                                                query_vector)
            except RetrievalError as exc:
                raise as_gateway_error(exc) from exc
            prompt = RagPrompt(self.system_prompt, chunks, question)
            report = RagReport(retrieval.collection, retriever.collection_version(retrieval.collection),
                               [c.citation() for c in chunks], round((time.perf_counter() - started) * 1000, 2))
        else:
            return None
        rewritten = request.model_copy(update={"messages": await asyncio.to_thread(rewrite_messages, request, prompt)})
        return RagResult(rewritten, prompt, report)

    def require_retriever(self) -> Retriever:
        """The retriever; GatewayError 503 `retrieval_unavailable` while it loads or after it failed."""
        retriever = self.retriever.value
        if retriever is None:
            raise GatewayError(503, f"retrieval is unavailable: {self.retriever.error or 'still loading'}",
                               code="retrieval_unavailable")
        return retriever

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
