"""What the semantic-cache tests do to a cache as a request would (shared by the real-Redis harness in
test_semcache.py and the embedded-store one in test_semcache_policy.py): a query of one end user, its lookup,
and a lookup-then-store; the subclass gives `vector(text)` and keeps each cache's metric registry."""

from __future__ import annotations

import numpy as np
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.lookup import CacheQuery, LookupResult
from prometheus_client import CollectorRegistry

MODEL = "test-model"
ANSWER = {"content": "The capital of France is Paris.", "finish_reason": "stop",
          "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}}


class CacheRequests:
    registries: dict[int, CollectorRegistry]

    def vector(self, text: str) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def query(text: str, tenant: str = "tenant-a", context: str = "ctx-1", user: str | None = "user-1",
              **controls: object) -> CacheQuery:
        """A query of one end user (user-scoped questions are cached only for a known user)."""
        return CacheQuery(tenant=tenant, model=MODEL, text=text, context=context, user=user, **controls)

    async def lookup(self, cache: SemanticCache, text: str, **query: object) -> LookupResult:
        return await cache.lookup(self.query(text, **query), self.vector(text))

    async def store(self, cache: SemanticCache, text: str, content: str | None = None, **query: object) -> str:
        """Look up (as the gateway does first), then store an answer; returns the entry id."""
        result = await self.lookup(cache, text, **query)
        assert result.status == "miss", result.report()
        response = {**ANSWER, "content": content or f"answer to {text}"}
        entry_id = await cache.put(self.query(text, **query), self.vector(text), result.category, response)
        assert entry_id is not None
        return entry_id

    def metric(self, cache: SemanticCache, name: str, **labels: str) -> float | None:
        return self.registries[id(cache)].get_sample_value(name, labels)
