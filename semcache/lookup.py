"""The semantic cache's request path: classify a question, search the tenant's partitions, serve a fresh
matching entry, store an answer (within the category's quota), and invalidate entries.

`CacheQuery` is the hand-off from the gateway (gateway/answer_cache.py) to this path, `LookupResult` the
one back. The index and the store's health are the replica's `CacheState` (state.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .answer_store import StoreUnavailable
from .categories import RULE_TEXT_CHARS, CategoryClassifier, Classification
from .entries import CacheEntry, CorruptEntry, owner_of
from .feedback import NO_RAISE, FeedbackLearner, LearnedRaise, ServedHit
from .index import IndexedEntry
from .policy import CachePolicy, EffectivePolicy
from .state import CacheState
from .tasks import cancel_and_wait
from .verifier import Verifier

log = logging.getLogger("blendgate.semcache")

# Longest life an entry gets, whatever a request or category asks: Redis refuses an expiry past ~2**63 ms,
# and that refusal, inside the write's transaction, left the entry without any TTL and the cache marked down.
MAX_TTL_S = 10 * 365 * 86_400.0
# Cosine similarity at which two questions are the same question (equal text embeds to within float error).
SAME_QUESTION = 0.9999


@dataclass
class CacheQuery:
    """One request as the cache sees it (the hand-off from the gateway's answer cache to the semantic cache).
    `context` digests everything besides the question that changes the answer (model, documents and their
    version, history, sampling); only equal contexts match."""

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
    """What a lookup found (the hand-off back to the gateway): `report()` is the response's
    blendgate.semantic_cache object."""

    status: str  # "hit", "miss" or "bypass"
    category: str | None = None
    # "tenant" or "user" once the question's scope is known (CacheLookup.scope_of), else None.
    scope: str | None = None
    reason: str | None = None
    similarity: float | None = None
    policy: EffectivePolicy | None = None
    classification: Classification | None = None
    entry: CacheEntry | None = None
    lookup_ms: float = 0.0

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


class CacheLookup:
    """Lookups, stores and invalidation on one replica's index and store.

    `candidates`: how many nearest entries a lookup checks per category; `asker_rules`: regular expressions
    that make a question user-scoped (SemanticCacheSettings); `verifier`: what a candidate must pass before it
    is served (None: nothing, every candidate at or above the threshold is); `feedback`: the thresholds learned
    from false-hit reports, added to the configured ones, and told of every hit served (None: none learned)."""

    def __init__(self, state: CacheState, policy: CachePolicy, classifier: CategoryClassifier, candidates: int,
                 asker_rules: list[str], verifier: Verifier | None = None,
                 feedback: FeedbackLearner | None = None) -> None:
        self.state = state
        self.verifier = verifier
        self.feedback = feedback
        self.policy = policy
        self.classifier = classifier
        self.candidates = candidates
        self.asker_rules = [re.compile(rule, re.IGNORECASE) for rule in asker_rules]
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        """Cancel the store calls still running in the background (hit counts, corrupt-entry deletes)."""
        await cancel_and_wait(self._background)

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- what applies to a question --------------------------------------------------------------------------
    def classify(self, text: str, vector: np.ndarray) -> Classification:
        return self.classifier.classify(text, vector)

    def scope_of(self, text: str, category: str) -> str:
        """"user" when the question refers to the asker (an asker rule matches its first RULE_TEXT_CHARS
        characters) or its category is user-scoped; else "tenant"."""
        head = text[:RULE_TEXT_CHARS]
        if self.policy.category(category).scope == "user" or any(rule.search(head) for rule in self.asker_rules):
            return "user"
        return "tenant"

    @staticmethod
    def owner_for(query: CacheQuery, scope: str) -> str | None:
        """Whose entries a query of this scope reads and writes: "" (the tenant's shared ones), the end user's
        owner_of hash, or None for a user-scoped question without a user (not cached)."""
        if scope == "tenant":
            return ""
        return owner_of(query.tenant, query.user) if query.user and query.user.strip() else None

    # -- lookup -----------------------------------------------------------------------------------------------
    async def lookup(self, query: CacheQuery, vector: np.ndarray) -> LookupResult:
        """The answer to a query with unit-length embedding `vector`, if a fresh entry of the caller matches
        (status "hit"); else why not ("miss", or "bypass" with a reason). Never raises for a store failure:
        the result is a bypass and the cache steps aside."""
        started = time.perf_counter()
        result = await self._lookup(query, vector)
        result.lookup_ms = (time.perf_counter() - started) * 1000
        category = result.category or "none"
        metrics = self.state.metrics
        metrics.lookup(category, query.tenant, result.status, result.scope or "none")
        metrics.lookup_seconds.labels(result.status).observe(result.lookup_ms / 1000)
        return result

    async def _lookup(self, query: CacheQuery, vector: np.ndarray) -> LookupResult:
        classification = self.classify(query.text, vector)
        policy = self.policy.policy_for(query.model, classification.category)
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
            result.reason = "no_user_for_user_scoped_question"
            return result
        if not self.state.available:
            result.reason = "store_unavailable"
            return result
        result.status = "miss"
        # Each category's threshold in force plus what false-hit reports taught (feedback.py); a neighbour
        # category's entry must pass the stricter of its own and the query's.
        learned = {classification.category: self._learned(query.tenant, classification.category)}
        own = policy.threshold + learned[classification.category].cosine
        thresholds = {classification.category: own}
        for name in classification.neighbours:
            neighbour = self.policy.policy_for(query.model, name)
            if neighbour.cached:
                learned[name] = self._learned(query.tenant, name)
                thresholds[name] = max(own, neighbour.threshold + learned[name].cosine)
        now = time.time()
        for meta, similarity, category in self.nearest(query.tenant, list(thresholds), vector, owner):
            if result.similarity is None:
                result.similarity = similarity  # the nearest, reported on misses too
            if similarity < own:
                break  # most similar first: nothing further can pass
            if similarity < thresholds[category]:
                continue
            if meta.context != query.context:
                continue
            if meta.expires_at <= now:
                self.state.unindex(meta.entry_id, "expired")
                continue
            if query.max_age_s is not None and now - meta.created_at > query.max_age_s:
                continue
            entry = await self._fetch(meta.entry_id, query, owner)
            if entry is None:
                if not self.state.available:
                    result.status, result.reason = "bypass", "store_unavailable"
                    return result
                continue
            if self.feedback is not None and \
                    self.feedback.refused_nearby(query.tenant, category, owner, entry.embedding, similarity):
                self.state.metrics.verifier_rejections.labels(category, "feedback").inc()
                continue
            served = self._verified(query, entry, similarity, category, thresholds[category], learned[category],
                                    policy.load_level)
            if served is None:
                continue
            if self.feedback is not None:
                self.feedback.served(entry.entry_id, served)
            meta.hits += 1
            meta.last_hit_at = now
            self._spawn(self._record_hit(entry.entry_id, now))
            result.status, result.entry, result.similarity = "hit", entry, similarity
            return result
        return result

    def _learned(self, tenant: str, category: str) -> LearnedRaise:
        return self.feedback.learned(tenant, category) if self.feedback is not None else NO_RAISE

    def _verified(self, query: CacheQuery, entry: CacheEntry, similarity: float, category: str,
                  cosine_threshold: float, learned: LearnedRaise, load_level: float) -> ServedHit | None:
        """The hit as served if the verifier lets `entry` (a candidate of `category` at `similarity`, past
        `cosine_threshold`, the model at `load_level`) answer the query, else None; the same question
        (SAME_QUESTION) always passes. The verifier's verdict must also reach the probability threshold learned
        from false-hit reports (FeedbackLearner.probability_threshold). A refusal is counted by category and
        reason ("feedback" for the learned threshold)."""
        if self.verifier is None or similarity >= SAME_QUESTION:
            return ServedHit(query.tenant, category, similarity, cosine_threshold, exact=similarity >= SAME_QUESTION)
        verdict = self.verifier.verify(query.text, entry.query, similarity, category, load_level)
        needed = self.feedback.probability_threshold(category, learned) if self.feedback is not None else None
        refused = (verdict.reason or "classifier") if not verdict.accepted else \
            "feedback" if needed is not None and verdict.probability < needed else None
        if refused is not None:
            self.state.metrics.verifier_rejections.labels(category, refused).inc()
            return None
        in_force = needed if needed is not None else self.verifier.thresholds.get(category)
        return ServedHit(query.tenant, category, similarity, cosine_threshold, verdict.probability,
                         in_force if in_force is not None else 0.0)

    def nearest(self, tenant: str, categories: list[str], vector: np.ndarray,
                owner: str) -> list[tuple[IndexedEntry, float, str]]:
        """The tenant's nearest entries of `owner` (see owner_for) in each of these categories, merged, most
        similar first, as (entry, cosine similarity, category)."""
        found = []
        for category in categories:
            partition = self.state.index.partition(tenant, category)
            if partition is not None:
                found += [(meta, similarity, category)
                          for meta, similarity in partition.search(vector, self.candidates, owner)]
        found.sort(key=lambda candidate: -candidate[1])
        return found

    async def _fetch(self, entry_id: str, query: CacheQuery, owner: str) -> CacheEntry | None:
        """The entry if it is still there, intact, fresh and the caller's (its tenant, and `owner`'s: shared
        when "", else that end user's); otherwise None (and cleaned up)."""
        try:
            fields = await self.state.store.get(entry_id)
        except StoreUnavailable as exc:
            self.state.mark_down("get", exc)
            return None
        if fields is None:  # expired or deleted in the store
            self.state.unindex(entry_id, "expired")
            return None
        try:
            entry = CacheEntry.from_fields(fields, self.state.dimension)
        except CorruptEntry as exc:
            log.warning("semantic cache: dropping corrupt entry %s (%s)", entry_id, exc)
            self._spawn(self.state.drop([entry_id], "corrupt"))
            return None
        if entry.tenant != query.tenant or entry.owner != owner or entry.context != query.context or \
                entry.expired():
            return None  # never another tenant's or end user's answer, whatever the index says
        return entry

    async def _record_hit(self, entry_id: str, now: float) -> None:
        try:
            await self.state.store.record_hit(entry_id, now)
        except StoreUnavailable as exc:
            self.state.mark_down("record_hit", exc)

    # -- store ------------------------------------------------------------------------------------------------
    async def put(self, query: CacheQuery, vector: np.ndarray, category: str, response: dict[str, Any]) -> str | None:
        """Store an answer ({"content", "finish_reason", "usage"}: what a hit replays) under `category`; returns
        the entry id, or None when policy, controls or the store say no."""
        policy = self.policy.policy_for(query.model, category)
        scope = self.scope_of(query.text, category)
        owner = self.owner_for(query, scope)
        if not policy.cached or owner is None or query.no_store or not self.state.available:
            return None
        entry = CacheEntry(tenant=query.tenant, category=category, context=query.context, model=query.model,
                           query=query.text, response=response, embedding=np.asarray(vector, dtype=np.float32),
                           ttl_s=min(query.ttl_s or policy.ttl_s, MAX_TTL_S), collection=query.collection,
                           settings=query.settings, scope=scope, owner=owner)
        # The same question answered again (a no-cache request, say) replaces its entry instead of piling up.
        replaced = [meta.entry_id for meta, similarity, _ in self.nearest(query.tenant, [category], vector, owner)
                    if similarity >= SAME_QUESTION and meta.context == query.context]
        try:
            await self.state.store.put(entry.entry_id, entry.to_fields(), entry.ttl_s)
        except StoreUnavailable as exc:
            self.state.mark_down("put", exc)
            return None
        self.state.index_entry(entry)
        self.state.metrics.stored(category, query.tenant)
        if replaced:
            await self.state.drop(replaced, "replaced")
        await self._enforce_quota(query.tenant, category, keep=entry.entry_id)
        return entry.entry_id

    async def _enforce_quota(self, tenant: str, category: str, keep: str) -> None:
        configured = self.policy.category(category)
        partition = self.state.index.partition(tenant, category)
        if partition is None or len(partition) <= configured.quota:
            return
        # Evict 1% below the quota at once, so a full category does not pay for a victim search per insert.
        count = len(partition) - configured.quota + configured.quota // 100
        # The entry just stored is never its own victim: under LFU it has no hits yet, and a full category
        # whose entries were all hit would otherwise throw away every new answer as soon as it is stored.
        victims = [v for v in partition.victims(count + 1, configured.eviction) if v.entry_id != keep]
        await self.state.drop([v.entry_id for v in victims[:count]], "quota")

    # -- invalidation -----------------------------------------------------------------------------------------
    async def invalidate(self, *, entry_id: str | None = None, collection: str | None = None,
                         category: str | None = None, tenant: str | None = None) -> int:
        """Drop matching entries (all given conditions must hold); returns how many went."""
        index = self.state.index
        doomed = []
        if entry_id is not None:  # one entry: found through the index's id map, not a scan
            where, meta = index.locate(entry_id), index.get(entry_id)
            if where is not None and meta is not None and (tenant is None or where[0] == tenant) and \
                    (category is None or where[1] == category) and \
                    (collection is None or meta.collection == collection):
                doomed.append(entry_id)
        else:
            for (part_tenant, part_category), partition in index.partitions.items():
                if tenant is not None and part_tenant != tenant or \
                        category is not None and part_category != category:
                    continue
                doomed += [meta.entry_id for meta in partition.entries.values()
                           if collection is None or meta.collection == collection]
        if doomed:
            await self.state.drop(doomed, "invalidated")
        return len(doomed)
