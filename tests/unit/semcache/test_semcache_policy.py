"""The semantic cache's policy on the embedded answer store with a fake embedder: tenant and context
isolation, invalidation, the load-adaptive policy and its gauges. No Redis and no model: what these
tests check does not depend on either (test_semcache.py keeps the real Redis and all-MiniLM-L6-v2 for
replica sync, restarts, outages, quota deletes in the store, and matching of real paraphrases).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from contextlib import asynccontextmanager
from typing import AsyncIterator

import numpy as np
import pytest
from blendgate.semcache.answer_store import MemoryAnswerStore
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.index import IndexedEntry
from blendgate.semcache.metrics import SemanticCacheMetrics
from blendgate.semcache.policy import LoadMonitor, effective_policy
from blendgate.semcache.settings import CategoryPolicy, LoadSettings, SemanticCacheSettings
from cache_requests import ANSWER, MODEL, CacheRequests
from prometheus_client import CollectorRegistry

QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"  # the same words once "'s" reads "is": similarity 1 here
UNRELATED = "How do I bake sourdough bread?"
DIMENSION = 256


def fake_embed(texts: list[str]) -> np.ndarray:
    """Bag-of-words embedding: each lower-cased word ("'s" read as "is") adds ±1 to a bucket chosen by its hash;
    rows are unit length. Texts of the same words embed equally; texts sharing no word are near orthogonal."""
    rows = np.zeros((len(texts), DIMENSION), np.float32)
    for row, text in zip(rows, texts):
        for word in re.findall(r"[a-z0-9]+", text.lower().replace("'s", " is")):
            digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
            row[int.from_bytes(digest[:3], "little") % DIMENSION] += 1.0 if digest[3] & 1 else -1.0
        norm = np.linalg.norm(row)
        if norm:
            row /= norm
    return rows


def catch_all(**category: object) -> SemanticCacheSettings:
    """One category ("factual", as the default classifier files these questions) that every question falls in."""
    policy = CategoryPolicy(name="factual", rules=["."], **{"threshold": 0.9, "ttl_s": 3600, **category})
    return SemanticCacheSettings(categories=[policy], default_category="factual")


class MemoryHarness(CacheRequests):
    """Builds caches over the in-memory answer store and runs the lookups and stores a request would."""

    def __init__(self) -> None:
        self.registries: dict[int, CollectorRegistry] = {}

    def cache(self, settings: SemanticCacheSettings | None = None, load: LoadMonitor | None = None) -> SemanticCache:
        registry = CollectorRegistry()
        cache = SemanticCache(settings or catch_all(), MemoryAnswerStore(), DIMENSION, fake_embed,
                              SemanticCacheMetrics(registry), load)
        self.registries[id(cache)] = registry
        return cache

    @staticmethod
    def vector(text: str) -> np.ndarray:
        return fake_embed([text])[0]


@pytest.fixture
def harness() -> MemoryHarness:
    return MemoryHarness()


@asynccontextmanager
async def running(cache: SemanticCache) -> AsyncIterator[None]:
    await cache.start()
    try:
        yield
    finally:
        await cache.close()


# -- context, tenants and invalidation ------------------------------------------------------------------------------


def test_another_context_is_a_miss(harness: MemoryHarness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            await harness.store(cache, QUESTION, context="model-a+docs-v1")
            assert (await harness.lookup(cache, QUESTION, context="model-a+docs-v1")).status == "hit"
            other = await harness.lookup(cache, QUESTION, context="model-a+docs-v2")
            assert other.status == "miss" and other.similarity is not None and other.similarity > 0.99
            # no-cache skips the lookup; max-age refuses entries older than it.
            assert (await harness.lookup(cache, QUESTION, context="model-a+docs-v1", no_cache=True)).reason == \
                "no-cache"
            await asyncio.sleep(0.05)
            assert (await harness.lookup(cache, QUESTION, context="model-a+docs-v1", max_age_s=0.01)).status == "miss"
            # no-store answers are not written.
            assert await cache.put(harness.query(UNRELATED, no_store=True), harness.vector(UNRELATED), "factual",
                                   ANSWER) is None

    asyncio.run(scenario())


def test_tenants_never_see_each_others_entries(harness: MemoryHarness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION, tenant="tenant-a")
            assert (await harness.lookup(cache, QUESTION, tenant="tenant-b")).status == "miss"
            assert (await harness.lookup(cache, QUESTION, tenant="tenant-a")).status == "hit"
            # Even if the index put tenant A's entry in tenant B's partition, the stored entry's tenant decides.
            meta = cache.index.get(entry_id)
            cache.index.add("tenant-b", "factual", IndexedEntry(**vars(meta)), harness.vector(QUESTION))
            leaked = await harness.lookup(cache, QUESTION, tenant="tenant-b")
            assert leaked.status == "miss" and leaked.entry is None
            # Tenant B's own answer to the same question is an entry of its own.
            other = await harness.store(cache, QUESTION, "B's answer", tenant="tenant-b")
            assert other != entry_id
            assert (await harness.lookup(cache, PARAPHRASE, tenant="tenant-b")).entry.response["content"] == \
                "B's answer"

    asyncio.run(scenario())


def test_one_entry_is_invalidated_only_when_every_condition_holds(harness: MemoryHarness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION, collection="handbook")
            tenant, category = cache.category_of(entry_id)
            assert tenant == "tenant-a" and cache.category_of("no-such-entry") is None
            # Another tenant's id, another collection or category: nothing goes.
            assert await cache.invalidate(entry_id=entry_id, tenant="tenant-b") == 0
            assert await cache.invalidate(entry_id=entry_id, collection="other") == 0
            assert await cache.invalidate(entry_id=entry_id, category=category + "-not") == 0
            assert await cache.invalidate(entry_id="no-such-entry") == 0
            assert await cache.invalidate(entry_id=entry_id, tenant=tenant, collection="handbook",
                                          category=category) == 1
            assert cache.category_of(entry_id) is None

    asyncio.run(scenario())


# -- load-adaptive policy -------------------------------------------------------------------------------------------


def test_load_level_rises_between_the_mark_and_twice_the_mark() -> None:
    monitor = LoadMonitor(LoadSettings(queue_depth_mark=4, latency_mark_ms=1000, latency_smoothing=0.5))
    depth = [0]
    monitor.watch_queue("m", lambda: depth[0])
    assert monitor.level("m") == 0.0 and monitor.level("unwatched") == 0.0
    for queued, level in [(3, 0.0), (4, 0.0), (6, 0.5), (8, 1.0), (100, 1.0), (0, 0.0)]:
        depth[0] = queued
        assert monitor.level("m") == pytest.approx(level)
    # Latency: an exponential moving average against its own mark; the higher of the two signals counts.
    monitor.observe_latency("m", 1500)
    assert monitor.level("m") == pytest.approx(0.5)
    monitor.observe_latency("m", 500)  # average 1000: at the mark
    assert monitor.level("m") == pytest.approx(0.0)
    depth[0] = 8
    assert monitor.level("m") == pytest.approx(1.0)
    assert monitor.signals("m") == {"queue_depth": 8.0, "latency_ms": 1000.0}
    assert monitor.models() == ["m"]


def test_effective_policy_moves_linearly_within_the_bounds() -> None:
    policy = CategoryPolicy(name="p", rules=["."], threshold=0.95, threshold_under_load=0.85, ttl_s=100,
                            ttl_under_load_s=300)
    at = {level: effective_policy(policy, level) for level in (-1.0, 0.0, 0.5, 1.0, 3.0)}
    assert (at[0.0].threshold, at[0.0].ttl_s) == (0.95, 100)
    assert at[0.5].threshold == pytest.approx(0.90) and at[0.5].ttl_s == pytest.approx(200)
    assert (at[1.0].threshold, at[1.0].ttl_s) == (pytest.approx(0.85), pytest.approx(300))
    assert at[3.0] == at[1.0] and at[-1.0] == at[0.0]  # never past the bounds
    fixed = effective_policy(CategoryPolicy(name="q", rules=["."], threshold=0.9, ttl_s=60), 1.0)
    assert (fixed.threshold, fixed.ttl_s) == (0.9, 60)
    with pytest.raises(ValueError, match="threshold_under_load"):
        CategoryPolicy(name="r", rules=["."], threshold=0.9, threshold_under_load=0.95)
    with pytest.raises(ValueError, match="ttl_under_load_s"):
        CategoryPolicy(name="r", rules=["."], ttl_s=100, ttl_under_load_s=50)


def test_the_policy_gauges_are_read_at_scrape_time(harness: MemoryHarness) -> None:
    """Threshold, TTL and load level in force follow the load without a lookup or a refresh before the scrape,
    for every model the load monitor watches (in the gateway: every backend's model)."""
    load = LoadMonitor(LoadSettings(queue_depth_mark=2, latency_mark_ms=60_000))
    depth = [0]
    load.watch_queue(MODEL, lambda: depth[0])
    cache = harness.cache(catch_all(threshold=0.99, threshold_under_load=0.9, ttl_s=100, ttl_under_load_s=300),
                          load)
    labels = {"model": MODEL, "category": "factual"}
    assert harness.metric(cache, "blendgate_semantic_cache_effective_threshold", **labels) == 0.99
    assert harness.metric(cache, "blendgate_semantic_cache_effective_ttl_seconds", **labels) == 100
    assert harness.metric(cache, "blendgate_model_load_level", model=MODEL) == 0
    depth[0] = 3  # half way
    assert harness.metric(cache, "blendgate_semantic_cache_effective_threshold", **labels) == pytest.approx(0.945)
    assert harness.metric(cache, "blendgate_semantic_cache_effective_ttl_seconds", **labels) == pytest.approx(200)
    assert harness.metric(cache, "blendgate_model_load_level", model=MODEL) == pytest.approx(0.5)
    # The values a lookup applies are the ones scraped.
    assert cache.policy_for(MODEL, "factual").threshold == pytest.approx(0.945)
    assert harness.metric(cache, "blendgate_semantic_cache_effective_threshold", model="unwatched",
                          category="factual") is None
