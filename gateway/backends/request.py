"""BackendRequest: a chat request as a backend receives it, the interface between the chat service
(gateway/chat.py, after the semantic-cache lookup and the RAG step of gateway/rag.py) and the backends
(gateway/backends/: local.py, sglang.py, upstream.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..rag_template import RagPrompt
from ..schemas import ChatCompletionRequest

if TYPE_CHECKING:
    from ..rag import RagResult


@dataclass(frozen=True)
class BackendRequest:
    """What a backend answers.

    `chat`: the client's request, its messages rewritten with the RAG template when RAG applies (what
    backends that only read messages send on, e.g. litellm's upstreams); `rag_prompt`: the RAG prompt's parts
    (system prompt, chunks, question), which the backends that tokenise in the gateway (local, SGLang) place
    as segments whose chunk KV can be reused, or None without RAG; `collection`: the collection the chunks
    were retrieved from (None for inline documents or without RAG); `tenant`: who asks (auth.ApiKeyAuth).
    """

    chat: ChatCompletionRequest
    tenant: str
    rag_prompt: RagPrompt | None = None
    collection: str | None = None

    @classmethod
    def of(cls, chat: ChatCompletionRequest, tenant: str, rag: RagResult | None) -> "BackendRequest":
        """The request as RagPlanner.prepare left it: the client's, or with RAG its rewritten one, its prompt
        and collection."""
        if rag is None:
            return cls(chat, tenant)
        return cls(rag.request, tenant, rag.prompt, rag.report.collection)

    @property
    def model(self) -> str:
        return self.chat.model
