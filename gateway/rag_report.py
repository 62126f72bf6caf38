"""RagReport: what the RAG step did for a chat request, the interface between gateway/rag.py (RagPlanner)
and what reads it: the response's `blendgate.rag` (backends/base.py: RequestContext.report) and the
retrieval-time series (gateway/metrics/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..retriever.document_store import CollectionVersion


def version_fields(version: CollectionVersion | None) -> dict:
    """A collection's version as answers report it: `version` (bumped by every change) and `generation` (the
    id of this collection since it was created; a collection deleted and created again has a new one)."""
    return {"version": None if version is None else version.number,
            "generation": None if version is None else version.generation}


@dataclass(frozen=True)
class RagReport:
    """`collection`: the collection retrieved from, None for inline documents; `version`: the collection's
    version when it was searched; `chunks`: each chunk's citation (id, source, position, score) in prompt
    order; `retrieval_ms`: embedding the question and searching, in milliseconds (None for inline documents)."""

    collection: str | None
    version: CollectionVersion | None
    chunks: list[dict[str, Any]]
    retrieval_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The response's `blendgate.rag`."""
        out = {"collection": self.collection, **version_fields(self.version), "chunks": self.chunks}
        if self.retrieval_ms is not None:
            out["retrieval_ms"] = self.retrieval_ms
        return out
