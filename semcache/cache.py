"""The semantic cache: classify, search the tenant's partition, serve fresh matching entries, store answers.

Search is in memory (HNSW per tenant and category); answers live in the entry store. The index is
rebuilt from the store at start-up and kept in step with other replicas by polling the store's change
stream. When the store fails or times out, the cache steps aside (lookups bypass, nothing is written)
and a background task brings it back once the store answers again: it sends the deletes that failed
meanwhile and catches up from the change stream where it left off, rebuilding the whole index only when
that is impossible (the index was never built, or changes past its cursor were trimmed or lost with
the store's data).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .categories import RULE_TEXT_CHARS, CategoryClassifier, Classification
from .entries import CacheEntry, CorruptEntry, owner_of
from .index import IndexedEntry, PartitionedIndex
from .metrics import SemanticCacheMetrics
from .policy import EffectivePolicy, LoadMonitor, effective_policy
from .settings import SemanticCacheSettings
from .answer_store import AnswerStore, Change, StoreUnavailable

log = logging.getLogger("blendgate.semcache")

SYNC_INTERVAL_S = 0.5  # how often a replica polls the change stream
SWEEP_INTERVAL_S = 5.0  # how often expired entries leave the in-memory index
# Longest life an entry gets, whatever a request or category asks: Redis refuses an expiry past ~2**63 ms,
# and that refusal, inside the write's transaction, left the entry without any TTL and the cache marked down.
MAX_TTL_S = 10 * 365 * 86_400.0
# Cosine similarity at which two questions are the same question (equal text embeds to within float error).
SAME_QUESTION = 0.9999


@dataclass
class CacheQuery:
    """One request as the cache sees it. `context` digests everything besides the question that changes
    the answer (model, documents and their version, history, sampling); only equal contexts match."""

    tenant: str
    model: str
    text: str
    context: str
    collection: str | None = None
    # The end user inside the tenant (OpenAI's `user` field or x-blendgate-user), None when not given. Only
    # its owner_of hash is stored; user-scoped questions without one are not cached.
    user: str | None = None
    # The readable form of `context` (CacheEntry.settings), stored with the answer.
    settings: dict[str, Any] = field(default_factory=dict)
    no_cache: bool = False
    no_store: bool = False
    ttl_s: float | None = None
    max_age_s: float | None = None


@dataclass
class LookupResult:
    status: str  # "hit", "miss" or "bypass"
    category: str | None = None
    # "tenant" or "user" once the question's scope is known (SemanticCache.scope_of), else None.
    scope: str | None = None
    reason: str | None = None
    similarity: float | None = None
    policy: EffectivePolicy | None = None
    classification: Classification | None = None
    entry: CacheEntry | None = None
    lookup_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"status": self.status, "category": self.category,
                                  "lookup_ms": round(self.lookup_ms, 3)}
        if self.scope:
            report["scope"] = self.scope
        if self.reason:
            report["reason"] = self.reason
        if self.policy is not None:
            report["threshold"] = round(self.policy.threshold, 4)
        if self.similarity is not None:
            report["similarity"] = round(self.similarity, 4)
        if self.entry is not None:
            report["entry_id"] = self.entry.entry_id
            report["age_s"] = round(time.time() - self.entry.created_at, 1)
        return report


class SemanticCache:
    def __init__(self, settings: SemanticCacheSettings, store: AnswerStore, dimension: int,
                 embed: Callable[[list[str]], np.ndarray], metrics: SemanticCacheMetrics,
                 load: LoadMonitor | None = None) -> None:
        self.settings = settings
        self.store = store
        self.dimension = dimension
        self.metrics = metrics
        self.load = load or LoadMonitor(settings.load)
        self.classifier = CategoryClassifier(settings.categories, embed, settings.default_category,
                                             settings.neighbour_margin)
        self.policies = {c.name: c for c in settings.categories}
        self.asker_rules = [re.compile(rule, re.IGNORECASE) for rule in settings.asker_rules]
        self.index = PartitionedIndex(dimension, settings.hnsw)
        self.available = False
        self.down_reason: str | None = None
        self._cursor: str | None = None
        self._rebuilding = False
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._recovering: asyncio.Task | None = None
        # Entries dropped from the index whose delete the store did not take: sent again when it answers.
        self._undeleted: set[str] = set()

    # -- life cycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            purged = await self.store.purge_other_namespaces()
            if purged:
                log.warning("semantic cache: dropped %d entries made with another embedder", purged)
            await self._rebuild("start")
        except StoreUnavailable as exc:
            self._mark_down("start", exc)
        self._tasks = [asyncio.create_task(self._sync_loop(), name="semcache sync"),
                       asyncio.create_task(self._sweep_loop(), name="semcache sweep")]

    async def close(self) -> None:
        for task in [*self._tasks, *self._background, *([self._recovering] if self._recovering else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
        await self.store.close()

    async def _rebuild(self, reason: str) -> None:
        """Index every live entry of the store; `reason` (start, recovery, lost_changes) labels the count of
        rebuilds. Raises StoreUnavailable."""
        started = time.perf_counter()
        self.metrics.rebuilds.labels(reason).inc()
        self._rebuilding = True  # sync waits: the changes it would apply to the old index are replayed after
        try:
            # Changes after this point are replayed by sync. The cursor moves with the new index only: a rebuild
            # that fails midway leaves the old index and its cursor, so recovery still knows what it missed.
            cursor = (await self.store.changes(None)).cursor
            corrupt: list[str] = []
            now = time.time()
            batches: dict[tuple[str, str], list[CacheEntry]] = {}
            async for entry_id, fields in self.store.scan():
                try:
                    entry = CacheEntry.from_fields(fields, self.dimension)
                except CorruptEntry as exc:
                    log.warning("semantic cache: dropping corrupt entry %s (%s)", entry_id, exc)
                    corrupt.append(entry_id)
                    continue
                if not entry.expired(now) and entry.category in self.policies:
                    batches.setdefault((entry.tenant, entry.category), []).append(entry)
            # Built off the event loop (a million entries take minutes) and swapped in whole, so lookups
            # keep using the old index meanwhile and never see one half built.
            self.index = await asyncio.to_thread(self._build_index, batches)
            self._cursor = cursor
        finally:
            self._rebuilding = False
        self.metrics.entries.clear()
        for tenant, category in self.index.partitions:
            self._count(tenant, category)
        if corrupt:
            await self.store.delete(corrupt)
            self.metrics.evictions.labels("unknown", "corrupt").inc(len(corrupt))
        self._mark_up()
        log.info("semantic cache: %d entries indexed from the %s store in %.2f s", len(self.index), self.store.kind,
                 time.perf_counter() - started)

    def _build_index(self, batches: dict[tuple[str, str], list[CacheEntry]]) -> PartitionedIndex:
        index = PartitionedIndex(self.dimension, self.settings.hnsw)
        for (tenant, category), entries in batches.items():
            index.add_many(tenant, category, [_indexed(e) for e in entries], np.stack([e.embedding for e in entries]))
        return index

    # -- faults -----------------------------------------------------------------------------------------
    def _mark_down(self, operation: str, exc: StoreUnavailable) -> None:
        self.metrics.store_errors.labels(operation).inc()
        if self.available or self.down_reason is None:
            log.warning("semantic cache: %s store unavailable during %s (%s); serving without the cache until it "
                        "returns", self.store.kind, operation, exc)
        self.available, self.down_reason = False, str(exc)
        self.metrics.store_up.set(0)
        if self._recovering is None or self._recovering.done():
            self._recovering = asyncio.create_task(self._recover(), name="semcache recover")

    def _mark_up(self) -> None:
        self.available, self.down_reason = True, None
        self.metrics.store_up.set(1)

    async def _recover(self) -> None:
        """Try the store at once (a timeout is often over by then), then every `redis_retry_s`, until it
        answers; then catch up and resume."""
        while True:
            try:
                await self.store.ping()
                if self._undeleted:
                    await self.store.delete(sorted(self._undeleted))
                    self._undeleted.clear()
                if self._cursor is None:  # the index was never built (the store was down at start-up)
                    await self._rebuild("recovery")
                else:  # changes made meanwhile, from where sync left off (a rebuild when they are lost)
                    await self._sync_once()
            except StoreUnavailable as exc:
                self.down_reason = str(exc)
                await asyncio.sleep(self.settings.redis_retry_s)
                continue
            self._mark_up()
            log.info("semantic cache: %s store is back; cache resumed", self.store.kind)
            return

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- index bookkeeping ------------------------------------------------------------------------------
    def _index(self, entry: CacheEntry) -> None:
        self.index.add(entry.tenant, entry.category, _indexed(entry), entry.embedding)
        self._count(entry.tenant, entry.category)

    def _unindex(self, entry_id: str, reason: str | None = None) -> None:
        removed = self.index.remove(entry_id)
        if removed is not None:
            tenant, category, _ = removed
            self._count(tenant, category)
            if reason:
                self.metrics.evictions.labels(category, reason).inc()

    def _count(self, tenant: str, category: str) -> None:
        self.metrics.count_entries(tenant, category, self.index.counts())

    async def _drop(self, entry_ids: list[str], reason: str) -> None:
        """Remove entries from the index now and from the store when it answers (at once, or on recovery)."""
        touched: dict[tuple[str, str], int] = {}
        for entry_id in entry_ids:
            removed = self.index.remove(entry_id)
            if removed is not None:
                touched[removed[:2]] = touched.get(removed[:2], 0) + 1
        for (tenant, category), count in touched.items():
            self._count(tenant, category)
            self.metrics.evictions.labels(category, reason).inc(count)
        if not self.available:
            self._undeleted.update(entry_ids)
            return
        try:
            await self.store.delete(entry_ids)
        except StoreUnavailable as exc:
            self._undeleted.update(entry_ids)
            self._mark_down("delete", exc)

    # -- policy -----------------------------------------------------------------------------------------
    def policy_for(self, model: str, category: str) -> EffectivePolicy:
        level = self.load.level(model)
        policy = effective_policy(self.policies[category], level)
        self.metrics.load_level.labels(model).set(level)
        self.metrics.threshold.labels(model, category).set(policy.threshold)
        self.metrics.ttl.labels(model, category).set(policy.ttl_s)
        return policy

    def effective_policies(self, models: list[str]) -> dict[str, Any]:
        """What operators see: per model, its load signals and each category's values in force."""
        return {model: {"load": {**self.load.signals(model), "level": round(self.load.level(model), 3)},
                        "categories": [self.policy_for(model, name).as_dict() for name in self.policies]}
                for model in models}

    def classify(self, text: str, vector: np.ndarray) -> Classification:
        return self.classifier.classify(text, vector)

    def scope_of(self, text: str, category: str) -> str:
        """"user" when the question refers to the asker (an asker rule matches its first RULE_TEXT_CHARS
        characters) or its category is user-scoped; else "tenant"."""
        head = text[:RULE_TEXT_CHARS]
        if self.policies[category].scope == "user" or any(rule.search(head) for rule in self.asker_rules):
            return "user"
        return "tenant"

    @staticmethod
    def owner_for(query: CacheQuery, scope: str) -> str | None:
        """Whose entries a query of this scope reads and writes: "" (the tenant's shared ones), the end user's
        owner_of hash, or None for a user-scoped question without a user (not cached)."""
        if scope == "tenant":
            return ""
        return owner_of(query.tenant, query.user) if query.user and query.user.strip() else None

    # -- request path -----------------------------------------------------------------------------------
    async def lookup(self, query: CacheQuery, vector: np.ndarray) -> LookupResult:
        started = time.perf_counter()
        result = await self._lookup(query, vector)
        result.lookup_ms = (time.perf_counter() - started) * 1000
        category = result.category or "none"
        self.metrics.lookup(category, query.tenant, result.status, result.scope or "none")
        self.metrics.lookup_seconds.labels(result.status).observe(result.lookup_ms / 1000)
        return result

    async def _lookup(self, query: CacheQuery, vector: np.ndarray) -> LookupResult:
        classification = self.classify(query.text, vector)
        policy = self.policy_for(query.model, classification.category)
        result = LookupResult("bypass", classification.category, policy=policy, classification=classification)
        if not policy.cached:
            result.reason = "category_not_cached"
            return result
        if query.no_cache:
            result.reason = "no-cache"
            return result
        result.scope = self.scope_of(query.text, classification.category)
        owner = self.owner_for(query, result.scope)
        if owner is None:
            result.reason = "no_user_for_personal_question"
            return result
        if not self.available:
            result.reason = "store_unavailable"
            return result
        result.status = "miss"
        # A neighbour category's entry must pass the stricter of its own and the query's threshold.
        thresholds = {classification.category: policy.threshold}
        for name in classification.neighbours:
            neighbour = self.policy_for(query.model, name)
            if neighbour.cached:
                thresholds[name] = max(policy.threshold, neighbour.threshold)
        now = time.time()
        for meta, similarity, category in self.nearest(query.tenant, list(thresholds), vector, owner):
            if result.similarity is None:
                result.similarity = similarity  # the nearest, reported on misses too
            if similarity < policy.threshold:
                break  # most similar first: nothing further can pass
            if similarity < thresholds[category]:
                continue
            if meta.context != query.context:
                continue
            if meta.expires_at <= now:
                self._unindex(meta.entry_id, "expired")
                continue
            if query.max_age_s is not None and now - meta.created_at > query.max_age_s:
                continue
            entry = await self._fetch(meta.entry_id, query, owner)
            if entry is None:
                if not self.available:
                    result.status, result.reason = "bypass", "store_unavailable"
                    return result
                continue
            meta.hits += 1
            meta.last_hit_at = now
            self._spawn(self._record_hit(entry.entry_id, now))
            result.status, result.entry, result.similarity = "hit", entry, similarity
            return result
        return result

    def nearest(self, tenant: str, categories: list[str], vector: np.ndarray,
                owner: str) -> list[tuple[IndexedEntry, float, str]]:
        """The tenant's nearest entries of `owner` (see owner_for) in each of these categories, merged, most
        similar first."""
        found = []
        for category in categories:
            partition = self.index.partition(tenant, category)
            if partition is not None:
                found += [(meta, similarity, category)
                          for meta, similarity in partition.search(vector, self.settings.candidates, owner)]
        found.sort(key=lambda candidate: -candidate[1])
        return found

    async def _fetch(self, entry_id: str, query: CacheQuery, owner: str) -> CacheEntry | None:
        """The entry if it is still there, intact, fresh and the caller's (its tenant, and `owner`'s: shared
        when "", else that end user's); otherwise None (and cleaned up)."""
        try:
            fields = await self.store.get(entry_id)
        except StoreUnavailable as exc:
            self._mark_down("get", exc)
            return None
        if fields is None:  # expired or deleted in the store
            self._unindex(entry_id, "expired")
            return None
        try:
            entry = CacheEntry.from_fields(fields, self.dimension)
        except CorruptEntry as exc:
            log.warning("semantic cache: dropping corrupt entry %s (%s)", entry_id, exc)
            self._spawn(self._drop([entry_id], "corrupt"))
            return None
        if entry.tenant != query.tenant or entry.owner != owner or entry.context != query.context or \
                entry.expired():
            return None  # never another tenant's or end user's answer, whatever the index says
        return entry

    async def _record_hit(self, entry_id: str, now: float) -> None:
        try:
            await self.store.record_hit(entry_id, now)
        except StoreUnavailable as exc:
            self._mark_down("record_hit", exc)

    async def put(self, query: CacheQuery, vector: np.ndarray, category: str, response: dict[str, Any]) -> str | None:
        """Store an answer; returns the entry id, or None when policy, controls or the store say no."""
        policy = self.policy_for(query.model, category)
        scope = self.scope_of(query.text, category)
        owner = self.owner_for(query, scope)
        if not policy.cached or owner is None or query.no_store or not self.available:
            return None
        entry = CacheEntry(tenant=query.tenant, category=category, context=query.context, model=query.model,
                           query=query.text, response=response, embedding=np.asarray(vector, dtype=np.float32),
                           ttl_s=min(query.ttl_s or policy.ttl_s, MAX_TTL_S), collection=query.collection,
                           settings=query.settings, scope=scope, owner=owner)
        # The same question answered again (a no-cache request, say) replaces its entry instead of piling up.
        replaced = [meta.entry_id for meta, similarity, _ in self.nearest(query.tenant, [category], vector, owner)
                    if similarity >= SAME_QUESTION and meta.context == query.context]
        try:
            await self.store.put(entry.entry_id, entry.to_fields(), entry.ttl_s)
        except StoreUnavailable as exc:
            self._mark_down("put", exc)
            return None
        self._index(entry)
        self.metrics.stored(category, query.tenant)
        if replaced:
            await self._drop(replaced, "replaced")
        await self._enforce_quota(query.tenant, category, keep=entry.entry_id)
        return entry.entry_id

    async def _enforce_quota(self, tenant: str, category: str, keep: str) -> None:
        quota = self.policies[category].quota
        partition = self.index.partition(tenant, category)
        if partition is None or len(partition) <= quota:
            return
        # Evict 1% below the quota at once, so a full category does not pay for a victim search per insert.
        count = len(partition) - quota + quota // 100
        # The entry just stored is never its own victim: under LFU it has no hits yet, and a full category
        # whose entries were all hit would otherwise throw away every new answer as soon as it is stored.
        victims = [v for v in partition.victims(count + 1, self.policies[category].eviction) if v.entry_id != keep]
        await self._drop([v.entry_id for v in victims[:count]], "quota")

    # -- invalidation -------------------------------------------------------------------------------------
    async def invalidate(self, *, entry_id: str | None = None, collection: str | None = None,
                         category: str | None = None, tenant: str | None = None) -> int:
        """Drop matching entries (all given conditions must hold); returns how many went."""
        doomed = []
        if entry_id is not None:  # one entry: found through the index's id map, not a scan
            where, meta = self.index.locate(entry_id), self.index.get(entry_id)
            if where is not None and meta is not None and (tenant is None or where[0] == tenant) and \
                    (category is None or where[1] == category) and \
                    (collection is None or meta.collection == collection):
                doomed.append(entry_id)
        else:
            for (part_tenant, part_category), partition in self.index.partitions.items():
                if tenant is not None and part_tenant != tenant or \
                        category is not None and part_category != category:
                    continue
                doomed += [meta.entry_id for meta in partition.entries.values()
                           if collection is None or meta.collection == collection]
        if doomed:
            await self._drop(doomed, "invalidated")
        return len(doomed)

    # -- operators' view -------------------------------------------------------------------------------------
    async def browse(self, *, search: str | None = None, category: str | None = None, tenant: str | None = None,
                     offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """Live entries, newest first, for the admin API. The index says which entries are live; their text
        is in the store, read only for the page shown (or, to search the question text, for every live
        entry of the filtered partitions)."""
        now = time.time()
        live: list[tuple[IndexedEntry, str, str]] = []
        for (part_tenant, part_category), partition in self.index.partitions.items():
            if tenant and part_tenant != tenant or category and part_category != category:
                continue
            live += [(meta, part_tenant, part_category) for meta in partition.entries.values()
                     if meta.expires_at > now]
        live.sort(key=lambda item: item[0].created_at, reverse=True)
        needle = (search or "").strip().lower()

        async def read(meta: IndexedEntry) -> CacheEntry | None:
            try:
                fields = await self.store.get(meta.entry_id)
                return CacheEntry.from_fields(fields, self.dimension) if fields is not None else None
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

    def category_of(self, entry_id: str) -> tuple[str, str] | None:
        """(tenant, category) of an indexed entry, or None."""
        return self.index.locate(entry_id)

    # -- background -----------------------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            if not self.available or self._rebuilding:
                continue
            try:
                await self._sync_once()
            except StoreUnavailable as exc:
                self._mark_down("sync", exc)

    async def _sync_once(self) -> None:
        """Apply the changes past the cursor, moving it past each one applied: a call the store fails midway
        resumes at the first change not applied. Raises StoreUnavailable."""
        feed = await self.store.changes(self._cursor)
        if feed.lost:
            log.warning("semantic cache: changes from other replicas were lost (trimmed, or the store lost its "
                        "data); rebuilding the index")
            await self._rebuild("lost_changes")
            return
        for change in feed.changes:
            await self._apply(change)
            self._cursor = change.position
        self._cursor = feed.cursor

    async def _apply(self, change: Change) -> None:
        if change.op == "del":
            self._unindex(change.entry_id)
        elif change.op == "put" and self.index.get(change.entry_id) is None:
            fields = await self.store.get(change.entry_id)
            if fields is None:
                return
            try:
                entry = CacheEntry.from_fields(fields, self.dimension)
            except CorruptEntry:
                return  # the lookup that finds it drops it
            if entry.category in self.policies and not entry.expired():
                self._index(entry)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Take expired entries out of the index (the store expires its own copies)."""
        now = now if now is not None else time.time()
        expired = [meta.entry_id for partition in list(self.index.partitions.values())
                   for meta in partition.expired(now)]
        for entry_id in expired:
            self._unindex(entry_id, "expired")
        return len(expired)

    def stats(self) -> dict[str, Any]:
        return {"store": self.store.kind, "available": self.available, "down_reason": self.down_reason,
                "entries": len(self.index),
                "partitions": [{"tenant": t, "category": c, "entries": n} for (t, c), n in self.index.counts().items()]}


def _indexed(entry: CacheEntry) -> IndexedEntry:
    return IndexedEntry(entry.entry_id, entry.context, entry.collection, entry.created_at, entry.expires_at,
                        entry.hits, entry.last_hit_at, entry.owner)
