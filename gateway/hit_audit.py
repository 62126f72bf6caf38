"""Hit audits in the gateway: the semantic-cache hits semcache/audit.py admits are answered again by their
backend in the background, after the cached answer was served, and the two answers compared (the policy, the
verdict and the paper followed are in that module's docstring).

An audit asks what a miss would: the same RAG preparation (retrieval for the new question), the same backend,
the client's request as a whole answer (not streamed). It counts in the model's in-flight requests, so the
load-adaptive policy sees it. A disagreement is learnt as a client's false-hit report would be
(SemanticCache.learn_false_hit) and invalidates the entry; every audit is counted by verdict in
`blendgate_semantic_cache_audits_total`. Audits never touch the response the client got.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import numpy as np

from ..semcache.audit import AuditTicket, HitAuditor
from ..semcache.cache import SemanticCache
from ..semcache.lookup import LookupResult
from ..semcache.tasks import cancel_and_wait
from .backends.base import ChatBackend, RequestContext
from .backends.request import BackendRequest
from .metrics.series import GatewayMetrics
from .rag import RagPlanner, Retrieval
from .schemas import ChatCompletionRequest

log = logging.getLogger("blendgate.gateway")

Embed = Callable[[list[str]], np.ndarray]  # unit-length vectors, one per text (retriever.embedder.Embedder.embed)


class HitAudits:
    """Starts and runs the audits `auditor` admits. `embed`: the cache's embedder, None while it loads (no audit
    then); `in_flight`: the chat service's per-model count of requests the backends work on."""

    def __init__(self, auditor: HitAuditor, rag: RagPlanner, metrics: GatewayMetrics,
                 embed: Callable[[], Embed | None], in_flight: dict[str, int]) -> None:
        self.auditor = auditor
        self.rag = rag
        self.metrics = metrics
        self.embed = embed
        self.in_flight = in_flight
        self.tasks: set[asyncio.Task] = set()

    def start(self, backend: ChatBackend, request: ChatCompletionRequest, tenant: str, cache: SemanticCache,
              result: LookupResult, retrieval: Retrieval | None, query_vector: np.ndarray,
              load_level: float) -> bool:
        """Start auditing this hit in the background if the auditor admits it; whether it did."""
        embed = self.embed()
        if embed is None:
            return False
        ticket = self.auditor.admit(result, tenant, load_level)
        if ticket is None:
            return False
        task = asyncio.create_task(self._audit(ticket, backend, request, cache, retrieval, query_vector, embed))
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return True

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self.auditor.done()

    async def close(self) -> None:
        """Cancel the audits still running (at shutdown), again while one absorbs its cancellation
        (semcache/tasks.py: an audit awaits a generation, whose calls may)."""
        await cancel_and_wait(list(self.tasks))

    async def _audit(self, ticket: AuditTicket, backend: ChatBackend, request: ChatCompletionRequest,
                     cache: SemanticCache, retrieval: Retrieval | None, query_vector: np.ndarray,
                     embed: Embed) -> None:
        try:
            answer = await self._answer_again(backend, request, ticket.tenant, retrieval, query_vector)
            vectors = await asyncio.to_thread(embed, [ticket.cached_answer, answer])
            agreement = float(np.dot(vectors[0], vectors[1]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed audit labels nothing; the client was served already
            log.warning("semantic cache: auditing entry %s failed: %r", ticket.entry_id, exc)
            self.metrics.audit(ticket.category, "failed")
            return
        verdict = self.auditor.verdict(agreement)
        self.metrics.audit(ticket.category, verdict)
        if verdict == "disagree":
            log.info("semantic cache: entry %s (%s) disagrees with the model's answer now (cosine %.3f): "
                     "counted as a false hit and invalidated", ticket.entry_id, ticket.category, agreement)
            cache.learn_false_hit(ticket.entry_id, ticket.tenant, ticket.category)
            await cache.invalidate(entry_id=ticket.entry_id, tenant=ticket.tenant)

    async def _answer_again(self, backend: ChatBackend, request: ChatCompletionRequest, tenant: str,
                            retrieval: Retrieval | None, query_vector: np.ndarray) -> str:
        """The backend's whole answer to the request, prepared as a miss would be."""
        whole = request.model_copy(update={"stream": False, "stream_options": None})
        rag = await self.rag.prepare(whole, retrieval, query_vector=query_vector)
        backend_request = BackendRequest.of(whole, tenant, rag)
        self.in_flight[request.model] += 1
        try:
            result = await backend.complete(backend_request, RequestContext())
        finally:
            self.in_flight[request.model] -= 1
        return result.message.get("content") or ""
