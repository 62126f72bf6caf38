"""One replica's cache state: the in-memory index over the answer store, and whether that store answers.

`CacheState` is the hand-off between the three parts of the semantic cache (composed in cache.py): the
lookup path (lookup.py) searches the index and writes entries; the replica sync (replica.py) builds the
index, keeps it in step with the store and the other replicas, and brings the store back after an outage;
the admin view (admin_view.py) reads it. Index bookkeeping that all of them do (adding, removing and
dropping entries, the entries gauge) and the store's up/down state live here, so each part keeps the
index and the metrics consistent the same way.
"""

from __future__ import annotations

import asyncio
import logging

from .answer_store import AnswerStore, StoreUnavailable
from .entries import CacheEntry
from .index import IndexedEntry, PartitionedIndex
from .metrics import SemanticCacheMetrics
from .settings import HnswSettings

log = logging.getLogger("blendgate.semcache")


class CacheState:
    """The index (swapped whole by a rebuild), the store and its health, and the entries still to delete.

    `available` is False until the first rebuild and while the store fails or times out: lookups bypass and
    nothing is written. `store_down` is set while it is False after a failure; the replica sync waits on it
    to start recovery. `undeleted`: ids dropped from the index whose delete the store has not taken yet."""

    def __init__(self, store: AnswerStore, dimension: int, hnsw: HnswSettings, metrics: SemanticCacheMetrics) -> None:
        self.store = store
        self.dimension = dimension
        self.hnsw = hnsw
        self.metrics = metrics
        self.index = PartitionedIndex(dimension, hnsw)
        self.available = False
        self.down_reason: str | None = None
        self.store_down = asyncio.Event()
        self.undeleted: set[str] = set()

    # -- the store's health ---------------------------------------------------------------------------------
    def mark_down(self, operation: str, exc: StoreUnavailable) -> None:
        """The store failed during `operation` (a label of the store-errors count): bypass the cache until the
        replica sync brings it back."""
        self.metrics.store_errors.labels(operation).inc()
        if self.available or self.down_reason is None:
            log.warning("semantic cache: %s store unavailable during %s (%s); serving without the cache until it "
                        "returns", self.store.kind, operation, exc)
        self.available, self.down_reason = False, str(exc)
        self.metrics.store_up.set(0)
        self.store_down.set()

    def mark_up(self) -> None:
        self.available, self.down_reason = True, None
        self.metrics.store_up.set(1)
        self.store_down.clear()

    # -- index bookkeeping ----------------------------------------------------------------------------------
    def index_entry(self, entry: CacheEntry) -> None:
        self.index.add(entry.tenant, entry.category, indexed(entry), entry.embedding)
        self.count(entry.tenant, entry.category)

    def unindex(self, entry_id: str, reason: str | None = None) -> None:
        """Take an entry out of the index (not the store); `reason` labels the evictions count, if given."""
        removed = self.index.remove(entry_id)
        if removed is not None:
            tenant, category, _ = removed
            self.count(tenant, category)
            if reason:
                self.metrics.evictions.labels(category, reason).inc()

    def count(self, tenant: str, category: str) -> None:
        """Set the entries gauge of this partition from the index."""
        self.metrics.count_entries(tenant, category, self.index.counts())

    def recount(self) -> None:
        """Set the entries gauge of every partition afresh (after the index was swapped)."""
        self.metrics.entries.clear()
        for tenant, category in self.index.partitions:
            self.count(tenant, category)

    async def drop(self, entry_ids: list[str], reason: str) -> None:
        """Remove entries from the index now and from the store when it answers (at once, or on recovery);
        `reason` labels the evictions count."""
        touched: dict[tuple[str, str], int] = {}
        for entry_id in entry_ids:
            removed = self.index.remove(entry_id)
            if removed is not None:
                touched[removed[:2]] = touched.get(removed[:2], 0) + 1
        for (tenant, category), count in touched.items():
            self.count(tenant, category)
            self.metrics.evictions.labels(category, reason).inc(count)
        if not self.available:
            self.undeleted.update(entry_ids)
            return
        try:
            await self.store.delete(entry_ids)
        except StoreUnavailable as exc:
            self.undeleted.update(entry_ids)
            self.mark_down("delete", exc)


def indexed(entry: CacheEntry) -> IndexedEntry:
    """What the index keeps of an entry (its answer stays in the store)."""
    return IndexedEntry(entry.entry_id, entry.context, entry.collection, entry.created_at, entry.expires_at,
                        entry.hits, entry.last_hit_at, entry.owner)

