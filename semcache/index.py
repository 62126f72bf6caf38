"""In-memory HNSW search over cached questions, one index per (tenant, category).

Only what a lookup needs to decide lives here (entry id, context digest, freshness, hit counts); the
answers stay in the answer store (answer_store.py). Deleted entries are tombstoned in hnswlib and their slots reused.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import hnswlib
import numpy as np

from .settings import HnswSettings


@dataclass
class IndexedEntry:
    entry_id: str
    context: str
    collection: str | None
    created_at: float
    expires_at: float
    hits: int = 0
    last_hit_at: float = 0.0
    # The owner_of hash of a user-scoped entry, "" for one the whole tenant shares.
    owner: str = ""

    def recency(self) -> float:
        return max(self.last_hit_at, self.created_at)


class _Graph:
    """One owner's HNSW graph within a partition (labels are the partition's)."""

    def __init__(self, dimension: int, hnsw: HnswSettings, capacity: int = 256) -> None:
        self.index = hnswlib.Index(space="ip", dim=dimension)
        self.index.init_index(max_elements=capacity, ef_construction=hnsw.ef_construction, M=hnsw.m,
                              allow_replace_deleted=True)
        self.index.set_ef(hnsw.ef_search)
        self.live = 0
        self.deleted = 0

    def add(self, label: int, vector: np.ndarray) -> None:
        if self.deleted == 0 and self.index.get_current_count() >= self.index.get_max_elements():
            self.index.resize_index(max(256, 2 * self.index.get_max_elements()))
        self.index.add_items(vector.reshape(1, -1), np.array([label]), replace_deleted=self.deleted > 0)
        self.deleted = max(0, self.deleted - 1)
        self.live += 1

    def add_many(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        needed = self.index.get_current_count() + len(labels)
        if needed > self.index.get_max_elements():
            self.index.resize_index(max(needed, 2 * self.index.get_max_elements()))
        self.index.add_items(np.ascontiguousarray(vectors, dtype=np.float32), labels, num_threads=-1)
        self.live += len(labels)

    def remove(self, label: int) -> None:
        self.index.mark_deleted(label)
        self.deleted += 1
        self.live -= 1

    def vector(self, label: int) -> np.ndarray:
        return np.asarray(self.index.get_items([label]), dtype=np.float32)[0]

    def search(self, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.live)
        while k > 0:
            try:
                labels, distances = self.index.knn_query(vector.reshape(1, -1), k=k, num_threads=1)
                return labels[0], distances[0]
            except RuntimeError:
                k //= 2  # hnswlib can find fewer than k live neighbours when many are tombstoned
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.float32)


class Partition:
    """One tenant's entries of one category: one HNSW graph per owner (the entries the whole tenant shares, and
    each end user's own), so that a search never walks, let alone returns, another owner's entries. (One graph
    with a filter skipped them but, for an owner with few entries, walked the whole graph through a Python
    callback: seconds at 1M entries, bench/results/semcache-qqp-2026-11-30.md.)"""

    def __init__(self, dimension: int, hnsw: HnswSettings, capacity: int = 256) -> None:
        self.dimension, self.hnsw, self.capacity = dimension, hnsw, capacity
        self.graphs: dict[str, _Graph] = {}
        self.entries: dict[int, IndexedEntry] = {}
        self.labels: dict[str, int] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _graph(self, owner: str) -> _Graph:
        graph = self.graphs.get(owner)
        if graph is None:
            graph = self.graphs[owner] = _Graph(self.dimension, self.hnsw, self.capacity)
        return graph

    def add(self, entry: IndexedEntry, vector: np.ndarray) -> None:
        if entry.entry_id in self.labels:
            return  # already indexed (our own change coming back from the shared store)
        label = self._next_label
        self._next_label += 1
        self._graph(entry.owner).add(label, vector)
        self.entries[label] = entry
        self.labels[entry.entry_id] = label

    def add_many(self, entries: list[IndexedEntry], vectors: np.ndarray) -> None:
        """Bulk insert (rebuilds, benchmarks): one hnswlib call per owner on all cores instead of one per entry."""
        keep = [i for i, e in enumerate(entries) if e.entry_id not in self.labels]
        by_owner: dict[str, list[int]] = {}
        for i in keep:
            by_owner.setdefault(entries[i].owner, []).append(i)
        for owner, rows in by_owner.items():
            labels = np.arange(self._next_label, self._next_label + len(rows))
            self._next_label += len(rows)
            self._graph(owner).add_many(labels, vectors[rows])
            for label, i in zip(labels, rows):
                self.entries[int(label)] = entries[i]
                self.labels[entries[i].entry_id] = int(label)

    def remove(self, entry_id: str) -> IndexedEntry | None:
        label = self.labels.pop(entry_id, None)
        if label is None:
            return None
        entry = self.entries.pop(label)
        graph = self.graphs[entry.owner]
        graph.remove(label)
        if graph.live == 0:
            del self.graphs[entry.owner]  # an end user's last entry gone: its graph with it
        return entry

    def get(self, entry_id: str) -> IndexedEntry | None:
        label = self.labels.get(entry_id)
        return None if label is None else self.entries.get(label)

    def vector(self, entry_id: str) -> np.ndarray | None:
        """The entry's embedding as indexed (float32, shape (dimension,)), or None when not indexed."""
        label = self.labels.get(entry_id)
        return None if label is None else self.graphs[self.entries[label].owner].vector(label)

    def search(self, vector: np.ndarray, k: int, owner: str = "") -> list[tuple[IndexedEntry, float]]:
        """Nearest entries of `owner` ("" the tenant's shared entries, else one end user's owner_of hash), most
        similar first, with cosine similarity (vectors are unit length). Only that owner's graph is searched."""
        graph = self.graphs.get(owner)
        if graph is None:
            return []
        labels, distances = graph.search(vector, k)
        # hnswlib's "ip" distance is 1 - inner product.
        return [(self.entries[int(label)], 1.0 - float(distance))
                for label, distance in zip(labels, distances) if int(label) in self.entries]

    def victims(self, count: int, eviction: str) -> list[IndexedEntry]:
        """The `count` entries the category's policy gives up first."""
        if eviction == "lfu":
            return heapq.nsmallest(count, self.entries.values(), key=lambda e: (e.hits, e.recency()))
        return heapq.nsmallest(count, self.entries.values(), key=IndexedEntry.recency)

    def expired(self, now: float) -> list[IndexedEntry]:
        return [e for e in self.entries.values() if e.expires_at <= now]


class PartitionedIndex:
    """All partitions; a tenant's lookups only ever reach that tenant's partitions."""

    def __init__(self, dimension: int, hnsw: HnswSettings) -> None:
        self.dimension = dimension
        self.hnsw = hnsw
        self.partitions: dict[tuple[str, str], Partition] = {}
        self._where: dict[str, tuple[str, str]] = {}  # entry id -> its partition

    def partition(self, tenant: str, category: str, create: bool = False) -> Partition | None:
        key = (tenant, category)
        found = self.partitions.get(key)
        if found is None and create:
            found = self.partitions[key] = Partition(self.dimension, self.hnsw)
        return found

    def add(self, tenant: str, category: str, entry: IndexedEntry, vector: np.ndarray) -> None:
        self.partition(tenant, category, create=True).add(entry, vector)
        self._where[entry.entry_id] = (tenant, category)

    def add_many(self, tenant: str, category: str, entries: list[IndexedEntry], vectors: np.ndarray) -> None:
        self.partition(tenant, category, create=True).add_many(entries, vectors)
        for entry in entries:
            self._where[entry.entry_id] = (tenant, category)

    def remove(self, entry_id: str) -> tuple[str, str, IndexedEntry] | None:
        key = self._where.pop(entry_id, None)
        if key is None:
            return None
        removed = self.partitions[key].remove(entry_id)
        return None if removed is None else (key[0], key[1], removed)

    def locate(self, entry_id: str) -> tuple[str, str] | None:
        return self._where.get(entry_id)

    def get(self, entry_id: str) -> IndexedEntry | None:
        key = self._where.get(entry_id)
        return None if key is None else self.partitions[key].get(entry_id)

    def vector(self, entry_id: str) -> np.ndarray | None:
        """An indexed entry's embedding (float32, shape (dimension,)), or None."""
        key = self._where.get(entry_id)
        return None if key is None else self.partitions[key].vector(entry_id)

    def __len__(self) -> int:
        return len(self._where)

    def counts(self) -> dict[tuple[str, str], int]:
        return {key: len(p) for key, p in self.partitions.items()}
