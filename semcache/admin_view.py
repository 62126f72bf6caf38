"""What operators see of the semantic cache (the admin API's semantic-cache pages): live entries page by
page, and the index's size per partition and the store's state. (The policy in force per model is
CachePolicy.in_force.)

Read-only: deleting entries is invalidation, on the request path's side (lookup.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .answer_store import StoreUnavailable
from .entries import CacheEntry, CorruptEntry
from .feedback import FeedbackLearner
from .index import IndexedEntry
from .state import CacheState
from .verifier import Verifier


class AdminView:
    """Reads one replica's CacheState (and its verifier and feedback learner, None when off) for operators."""

    def __init__(self, state: CacheState, verifier: Verifier | None = None,
                 feedback: FeedbackLearner | None = None) -> None:
        self.state = state
        self.verifier = verifier
        self.feedback = feedback

    async def browse(self, *, search: str | None = None, category: str | None = None, tenant: str | None = None,
                     offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """Live entries, newest first: {"total", "offset", "limit", "data": [entry objects]} (docs/admin-api.md).
        The index says which entries are live; their text is in the store, read only for the page shown (or,
        to search the question text, for every live entry of the filtered partitions). Entries the store
        cannot give (gone, corrupt, the store down) are left out of the page."""
        now = time.time()
        live: list[tuple[IndexedEntry, str, str]] = []
        for (part_tenant, part_category), partition in self.state.index.partitions.items():
            if tenant and part_tenant != tenant or category and part_category != category:
                continue
            live += [(meta, part_tenant, part_category) for meta in partition.entries.values()
                     if meta.expires_at > now]
        live.sort(key=lambda item: item[0].created_at, reverse=True)
        needle = (search or "").strip().lower()

        async def read(meta: IndexedEntry) -> CacheEntry | None:
            try:
                fields = await self.state.store.get(meta.entry_id)
                return CacheEntry.from_fields(fields, self.state.dimension) if fields is not None else None
            except (StoreUnavailable, CorruptEntry):
                return None

        if needle:
            entries = [e for e in await asyncio.gather(*(read(meta) for meta, _, _ in live))
                       if e is not None and needle in e.query.lower()]
            total, page = len(entries), entries[offset:offset + limit]
        else:
            total = len(live)
            page = [e for e in await asyncio.gather(*(read(meta) for meta, _, _ in live[offset:offset + limit]))
                    if e is not None]
        return {"total": total, "offset": offset, "limit": limit,
                "data": [{"id": e.entry_id, "tenant": e.tenant, "category": e.category, "scope": e.scope,
                          "owner": e.owner or None, "model": e.model,
                          "collection": e.collection, "settings": e.settings, "query": e.query,
                          "response": e.response.get("content"),
                          "created_at": e.created_at, "expires_at": e.expires_at, "hits": e.hits} for e in page]}

    def stats(self) -> dict[str, Any]:
        """The store's kind and state, the index's entries in all and per (tenant, category) partition, and the
        verifier's false-hit bound per category (bound.Calibration.as_dict, with the probability threshold
        in force, null when guards alone decide) or None when the verifier is off, and what false-hit reports
        taught per category (feedback.CategoryFeedback.as_dict, with each tenant's) or None when learning is
        off."""
        state = self.state
        verifier = None
        if self.verifier is not None:
            verifier = {"source": self.verifier.model.source,
                        "categories": [{**c.as_dict(), "threshold_in_force": self.verifier.thresholds[name]}
                                       for name, c in self.verifier.calibrations.items()]}
        return {"store": state.store.kind, "available": state.available, "down_reason": state.down_reason,
                "entries": len(state.index),
                "partitions": [{"tenant": t, "category": c, "entries": n}
                               for (t, c), n in state.index.counts().items()],
                "verifier": verifier,
                "feedback": None if self.feedback is None else
                {"categories": [c.as_dict() for c in self.feedback.categories()]}}

