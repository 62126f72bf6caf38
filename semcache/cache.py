"""The semantic cache of one replica: classify, search the tenant's partition, serve fresh matching entries,
store answers. The gateway (gateway/answer_cache.py, the admin API) holds one `SemanticCache`.

Search is in memory (HNSW per tenant and category, index.py); answers live in the answer store
(answer_store.py). `SemanticCache` composes the parts, each in a module of its own:

- state.py, `CacheState`: the index and the store's health, shared by the parts below;
- lookup.py, `CacheLookup`: lookups, stores (within quota) and invalidation; `CacheQuery` in, `LookupResult` out;
- replica.py, `ReplicaSync`: the index's build at start-up, replica sync from the store's change stream,
  sweeping of expired entries, and recovery after the store fails;
- verifier.py, `Verifier`: what a candidate hit must pass (guards.py, a classifier) before it is served, at
  the probability threshold calibrated for its category's false-hit bound (bound.py);
- feedback.py, `FeedbackLearner`: the thresholds learned per tenant and category from clients' false-hit
  reports (raised past the category's false-hit bound, relaxed within it);
- admin_view.py, `AdminView`: what operators browse;
- policy.py, `CachePolicy`: the categories' policies and the load-adaptive values in force, which
  metrics.py's `PolicyCollector` exposes at scrape time.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .admin_view import AdminView
from .answer_store import AnswerStore
from .categories import CategoryClassifier, Classification
from .feedback import FeedbackLearner, ReportOutcome
from .index import PartitionedIndex
from .lookup import CacheLookup, CacheQuery, LookupResult
from .metrics import SemanticCacheMetrics
from .policy import CachePolicy, EffectivePolicy, LoadMonitor
from .replica import ReplicaSync
from .settings import SemanticCacheSettings
from .state import CacheState
from .verifier import Verifier


class SemanticCache:
    """One replica's semantic cache over `store`, for `embed` (texts -> unit-length rows of `dimension`
    float32), reporting on `metrics` (whose registry also gets the policy gauges) and loosening its policy
    with `load`. `start` before use, `close` after."""

    def __init__(self, settings: SemanticCacheSettings, store: AnswerStore, dimension: int,
                 embed: Callable[[list[str]], np.ndarray], metrics: SemanticCacheMetrics,
                 load: LoadMonitor | None = None) -> None:
        self.settings = settings
        self.policy = CachePolicy(settings.categories, load or LoadMonitor(settings.load))
        self.state = CacheState(store, dimension, settings.hnsw, metrics)
        classifier = CategoryClassifier(settings.categories, embed, settings.default_category,
                                        settings.neighbour_margin)
        self.verifier = Verifier.load(settings.verifier_path, settings.categories) if settings.verifier else None
        self.feedback = FeedbackLearner(settings.feedback, self.policy,
                                        self.verifier.thresholds if self.verifier is not None else None) \
            if settings.feedback.enabled else None
        self.lookups = CacheLookup(self.state, self.policy, classifier, settings.candidates, settings.asker_rules,
                                   self.verifier, self.feedback)
        self.replica = ReplicaSync(self.state, self.policy, settings.redis_retry_s)
        self.admin = AdminView(self.state, self.verifier, self.feedback)
        metrics.watch_policy(self.policy)
        if self.verifier is not None:
            metrics.watch_bound(self.verifier)
        if self.feedback is not None:
            metrics.watch_feedback(self.feedback)

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def store(self) -> AnswerStore:
        return self.state.store

    @property
    def index(self) -> PartitionedIndex:
        return self.state.index

    @property
    def available(self) -> bool:
        """False before start-up's build and while the store fails: lookups bypass, nothing is written."""
        return self.state.available

    @property
    def down_reason(self) -> str | None:
        return self.state.down_reason

    # -- life cycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.replica.start()

    async def close(self) -> None:
        await self.replica.close()
        await self.lookups.close()
        await self.state.store.close()

    # -- request path -----------------------------------------------------------------------------------------
    async def lookup(self, query: CacheQuery, vector: np.ndarray) -> LookupResult:
        return await self.lookups.lookup(query, vector)

    async def put(self, query: CacheQuery, vector: np.ndarray, category: str, response: dict[str, Any]) -> str | None:
        return await self.lookups.put(query, vector, category, response)

    def classify(self, text: str, vector: np.ndarray) -> Classification:
        return self.lookups.classify(text, vector)

    def scope_of(self, text: str, category: str) -> str:
        return self.lookups.scope_of(text, category)

    def policy_for(self, model: str, category: str) -> EffectivePolicy:
        return self.policy.policy_for(model, category)

    async def invalidate(self, *, entry_id: str | None = None, collection: str | None = None,
                         category: str | None = None, tenant: str | None = None) -> int:
        return await self.lookups.invalidate(entry_id=entry_id, collection=collection, category=category,
                                             tenant=tenant)

    def learn_false_hit(self, entry_id: str, tenant: str, category: str) -> ReportOutcome | None:
        """A client of `tenant` reports the hit served from `entry_id` (of `category`, see category_of) as
        wrong: the learned thresholds and the entry's neighbourhood take it in (feedback.py; call it before
        invalidating the entry, whose embedding it reads from the index); None when learning is off.
        Invalidating the entry is `invalidate`'s."""
        if self.feedback is None:
            return None
        meta = self.state.index.get(entry_id)
        return self.feedback.report(entry_id, tenant, category, meta.owner if meta is not None else None,
                                    self.state.index.vector(entry_id))

    def category_of(self, entry_id: str) -> tuple[str, str] | None:
        """(tenant, category) of an indexed entry, or None."""
        return self.state.index.locate(entry_id)

    def sweep(self, now: float | None = None) -> int:
        return self.replica.sweep(now)

    # -- operators' view --------------------------------------------------------------------------------------
    async def browse(self, *, search: str | None = None, category: str | None = None, tenant: str | None = None,
                     offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return await self.admin.browse(search=search, category=category, tenant=tenant, offset=offset, limit=limit)

    def stats(self) -> dict[str, Any]:
        return self.admin.stats()

    def effective_policies(self, models: list[str]) -> dict[str, Any]:
        return self.policy.in_force(models)
