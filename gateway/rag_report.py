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

    def cached(self) -> dict[str, Any]:
        """What the semantic cache keeps of it with an answer: as_dict() without the retrieval time (a hit that
        replays the answer retrieves nothing)."""
        return {key: value for key, value in self.as_dict().items() if key != "retrieval_ms"}

    @classmethod
    def from_cached(cls, data: Any) -> RagReport | None:
        """The report a cached answer was generated with (cached()), for the hit that replays it: the same
        collection, version and chunk citations. None for an entry stored without one (an answer without RAG,
        or stored before answers kept it) or with one not of that shape."""
        if not isinstance(data, dict) or not isinstance(data.get("chunks"), list) \
                or not all(isinstance(chunk, dict) for chunk in data["chunks"]):
            return None
        collection, generation, number = data.get("collection"), data.get("generation"), data.get("version")
        if collection is not None and not isinstance(collection, str):
            return None
        version = CollectionVersion(generation, number) \
            if isinstance(generation, str) and isinstance(number, int) else None
        return cls(collection, version, data["chunks"])
