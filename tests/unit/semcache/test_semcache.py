"""The semantic cache on its own: the real embedder (all-MiniLM-L6-v2) and a real Redis server, for what they
prove (matching of real paraphrases, classification, entries and TTLs in Redis, replica sync, restarts, outages and
recovery). Policy that needs neither is tested on the embedded store in test_semcache_policy.py.

Each test works under a key prefix of its own, so tests sharing the session's Redis never see each other.
Tests are plain functions that drive their scenario with asyncio.run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import numpy as np
import pytest
from blendgate.semcache.answer_store import MemoryAnswerStore, RedisAnswerStore
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.lookup import MAX_TTL_S, CacheQuery
from blendgate.semcache.metrics import SemanticCacheMetrics, TenantLabel
from blendgate.semcache.policy import LoadMonitor
from blendgate.semcache.replica import SYNC_INTERVAL_S
from blendgate.semcache.settings import CategoryPolicy, LoadSettings, SemanticCacheSettings
from cache_requests import ANSWER, MODEL, CacheRequests
from prometheus_client import CollectorRegistry
from support import RedisServer

QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"  # cosine 0.99 with QUESTION: above every category's threshold
UNRELATED = "How do I bake sourdough bread?"


@pytest.fixture(scope="module")
def embed(embedder) -> Callable[[list[str]], np.ndarray]:
    """The embedder, memoised: every cache built here embeds the same category examples."""
    memo: dict[str, np.ndarray] = {}

    def embed_texts(texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in memo]
        if missing:
            memo.update(zip(missing, embedder.embed(missing)))
        return np.stack([memo[t] for t in texts]) if texts else np.zeros((0, embedder.dimension), np.float32)

    return embed_texts


@pytest.fixture
def prefix() -> str:
    return f"bgtest:{uuid.uuid4().hex[:12]}"


def general_settings(**category: object) -> SemanticCacheSettings:
    """One catch-all category, so eviction and load tests do not depend on the default classifier."""
    policy = CategoryPolicy(name="general", rules=["."], **{"threshold": 0.9, "ttl_s": 3600, **category})
    return SemanticCacheSettings(categories=[policy], default_category="general")


class Harness(CacheRequests):
    """Builds caches over the real Redis and runs the lookups and stores a request would."""

    def __init__(self, redis: RedisServer, embed: Callable[[list[str]], np.ndarray], prefix: str) -> None:
        self.redis = redis
        self.embed = embed
        self.prefix = prefix
        self.direct = redis.client()
        self.dimension = embed(["dimension"]).shape[1]
        self.registries: dict[int, CollectorRegistry] = {}

    def cache(self, settings: SemanticCacheSettings | None = None, namespace: str = "ns",
              load: LoadMonitor | None = None, prefix: str | None = None) -> SemanticCache:
        settings = settings or SemanticCacheSettings(redis_url=self.redis.url)
        store = RedisAnswerStore(self.redis.url, prefix or self.prefix, namespace, settings.redis_timeout_ms / 1000)
        registry = CollectorRegistry()
        cache = SemanticCache(settings, store, self.dimension, self.embed, SemanticCacheMetrics(registry), load)
        self.registries[id(cache)] = registry
        return cache

    def vector(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def key(self, cache: SemanticCache, entry_id: str) -> str:
        assert isinstance(cache.store, RedisAnswerStore)
        return cache.store._key(entry_id)

    def keys(self, pattern: str = "*") -> list[bytes]:
        return list(self.direct.scan_iter(f"{self.prefix}:{pattern}"))


@pytest.fixture
def harness(redis_server: RedisServer, embed, prefix: str) -> Harness:
    return Harness(redis_server, embed, prefix)


@asynccontextmanager
async def running(*caches: SemanticCache) -> AsyncIterator[None]:
    for cache in caches:
        await cache.start()
    try:
        yield
    finally:
        for cache in caches:
            await cache.close()


async def eventually(condition: Callable[[], object], timeout_s: float = 3.0) -> None:
    """Wait for a condition that other replicas or background tasks make true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s")
        await asyncio.sleep(0.05)


# -- hits, misses and categories ----------------------------------------------------------------------------------


def test_paraphrase_hits_and_an_unrelated_question_misses(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION, ANSWER["content"])
            hit = await harness.lookup(cache, PARAPHRASE)
            assert hit.status == "hit" and hit.category == "factual"
            assert hit.entry is not None and hit.entry.entry_id == entry_id
            assert hit.entry.response == ANSWER
            assert hit.similarity is not None and hit.similarity >= hit.policy.threshold
            report = hit.report()
            assert report["entry_id"] == entry_id and report["status"] == "hit"
            miss = await harness.lookup(cache, UNRELATED)
            assert miss.status == "miss" and miss.entry is None
            # The entry is a Redis hash that expires with the category's TTL.
            ttl_ms = harness.direct.pttl(harness.key(cache, entry_id))
            assert 0 < ttl_ms <= cache.settings.category("factual").ttl_s * 1000
            assert harness.metric(cache, "blendgate_semantic_cache_lookups_total", category="factual",
                                  tenant="tenant-a", result="hit") == 1
            assert harness.metric(cache, "blendgate_semantic_cache_stores_total", category="factual",
                                  tenant="tenant-a") == 1
            # The hit is counted in the store too (in the background).
            key = harness.key(cache, entry_id)
            await eventually(lambda: harness.direct.hget(key, "hits") == b"1")

    asyncio.run(scenario())


def test_classifier_sends_queries_to_their_category(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        code = cache.classify("How do I merge two dictionaries?", harness.vector("How do I merge two dictionaries?"))
        assert code.category == "code"
        weather = "What's the weather in Paris today?"
        classified = cache.classify(weather, harness.vector(weather))
        assert (classified.category, classified.method) == ("time_sensitive", "rule")
        async with running(cache):
            # Personal questions are never cached: no lookup, nothing stored.
            personal = await harness.lookup(cache, "where is my package")
            assert (personal.status, personal.category, personal.reason) == ("bypass", "personal",
                                                                            "category_not_cached")
            stored = await cache.put(harness.query("where is my package"), harness.vector("where is my package"),
                                     "personal", ANSWER)
            assert stored is None and harness.keys("*:entry:*") == []
            # Time-sensitive answers live minutes, not days.
            await harness.store(cache, weather)
            (key,) = harness.keys("*:entry:*")
            assert 0 < harness.direct.pttl(key) <= cache.settings.category("time_sensitive").ttl_s * 1000

    asyncio.run(scenario())


# Pairs for the default asker rules: a question that refers to the asker, and a close one that does not.
ASKER_PAIRS = [
    ("What grade did I get on the chemistry exam?", "What grade is needed to pass a chemistry exam?"),
    ("Remind me what I said my daughter's name was.", "What does the name Sophia mean?"),
    ("Why does my Python script crash on import?", "How do I fix a Python script that crashes on import?"),
    ("What is our company's refund policy?", "What is a typical refund policy for online shops?"),
    ("I'm allergic to nuts, which cakes are safe?", "Which cakes are usually free of nuts?"),
    ("Tell me the password hint I gave you.", "Tell me what a good password hint looks like."),
    ("Is that phone number mine?", "How are phone numbers assigned?"),
    ("Quel est le nom de mon chien ?", "Quel est le nom du chien de Tintin ?"),
    ("¿Cuál es la dirección de mi oficina?", "¿Cuál es la capital de España?"),
    ("Wie heißt meine Schwester?", "Wie heißt die Hauptstadt von Frankreich?"),
]


def test_questions_that_refer_to_the_asker_are_user_scoped_whatever_their_category(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        for about_asker, shared in ASKER_PAIRS:
            assert cache.scope_of(about_asker, "factual") == "user", about_asker
            assert cache.scope_of(shared, "factual") == "tenant", shared
            assert cache.scope_of(shared, "conversational") == "user"  # the category's own scope
        async with running(cache):
            question = "What grade did I get on the chemistry exam?"
            for user in (None, "  "):  # no user known: not cached
                bypass = await harness.lookup(cache, question, user=user)
                assert (bypass.status, bypass.reason) == ("bypass", "no_user_for_user_scoped_question")
                assert await cache.put(harness.query(question, user=user), harness.vector(question), "factual",
                                       ANSWER) is None
            await harness.store(cache, question, user="alice")
            assert (await harness.lookup(cache, question, user="alice")).status == "hit"
            assert (await harness.lookup(cache, question, user="bob")).status == "miss"
            shared = "What is the capital of Australia?"
            await harness.store(cache, shared, user="alice")
            assert (await harness.lookup(cache, shared, user="bob")).status == "hit"
            assert (await harness.lookup(cache, shared, user=None)).status == "hit"

    asyncio.run(scenario())


def test_classifying_a_long_question_takes_milliseconds(harness: Harness) -> None:
    """Rules run on the event loop: over a whole 5 MB question the default rules took 2 s, and the code rule
    (`def ... [:(]`) is quadratic on text like the first here (4 s for its 110 kB); they read the question's
    beginning only."""
    cache = harness.cache()
    vector = harness.vector(QUESTION)
    cases = [(("def " + "x" * 50 + " ") * 2_000, "centroid", None),  # no rule matches: every rule reads it all
             ("Is it raining today? " + "the quick brown fox " * 250_000, "rule", "time_sensitive")]
    for text, method, category in cases:
        started = time.monotonic()
        classification = cache.classify(text, vector)
        assert time.monotonic() - started < 0.5, f"classifying {len(text)} characters took too long"
        assert classification.method == method and category in (None, classification.category)


def test_a_query_near_a_category_boundary_also_searches_the_neighbour_category(harness: Harness) -> None:
    def settings(margin: float) -> SemanticCacheSettings:
        return SemanticCacheSettings(redis_url=harness.redis.url, neighbour_margin=margin, categories=[
            CategoryPolicy(name="geography", examples=["What is the capital of Spain?"], threshold=0.8),
            CategoryPolicy(name="strict", examples=["How do I reverse a list in Python?"], threshold=0.995),
        ], default_category="geography")

    async def scenario() -> None:
        near = harness.cache(settings(2.0))
        async with running(near):
            classified = near.classify(QUESTION, harness.vector(QUESTION))
            assert (classified.category, classified.neighbours) == ("geography", ("strict",))
            # Stored under the other category (as a replica whose classifier put it there would have).
            await near.put(harness.query(QUESTION), harness.vector(QUESTION), "strict", ANSWER)
            assert (await harness.lookup(near, QUESTION)).status == "hit"
            # The neighbour's entry is held to the stricter threshold: 0.99 passes geography's 0.8, not 0.995.
            paraphrase = await harness.lookup(near, PARAPHRASE)
            assert paraphrase.status == "miss" and 0.8 < paraphrase.similarity < 0.995
        own_only = harness.cache(settings(0.0))
        async with running(own_only):
            assert own_only.classify(QUESTION, harness.vector(QUESTION)).neighbours == ()
            assert (await harness.lookup(own_only, QUESTION)).status == "miss"

    asyncio.run(scenario())


def test_the_same_question_answered_again_replaces_its_entry(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            first = await harness.store(cache, QUESTION, "first answer")
            # A no-cache request skips the lookup and stores its fresh answer: it replaces the old entry.
            second = await cache.put(harness.query(QUESTION), harness.vector(QUESTION), "factual",
                                     {**ANSWER, "content": "second answer"})
            assert second is not None and second != first
            hit = await harness.lookup(cache, QUESTION)
            assert hit.status == "hit" and hit.entry.response["content"] == "second answer"
            assert len(cache.index.partition("tenant-a", "factual")) == 1
            await eventually(lambda: len(harness.keys("*:entry:*")) == 1)
            assert harness.metric(cache, "blendgate_semantic_cache_evictions_total", category="factual",
                                  reason="replaced") == 1
            # Another context is another answer, kept beside it.
            await harness.store(cache, QUESTION, "other docs", context="ctx-2")
            assert len(cache.index.partition("tenant-a", "factual")) == 2

    asyncio.run(scenario())


def test_expired_entries_are_never_served_and_sweep_removes_them(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            kept = await harness.store(cache, UNRELATED)
            short = await harness.store(cache, QUESTION, ttl_s=1)
            swept = await harness.store(cache, "Who painted the Mona Lisa?", ttl_s=1)
            assert 0 < harness.direct.pttl(harness.key(cache, short)) <= 1000
            assert (await harness.lookup(cache, PARAPHRASE)).status == "hit"
            await asyncio.sleep(1.1)
            assert (await harness.lookup(cache, PARAPHRASE)).status == "miss"
            assert cache.index.get(short) is None
            assert cache.index.get(swept) is not None  # not looked up since: still indexed ...
            assert cache.sweep() == 1  # ... until the sweep
            assert cache.index.get(swept) is None and cache.index.get(kept) is not None
            assert not harness.direct.exists(harness.key(cache, short), harness.key(cache, swept))
            assert (await harness.lookup(cache, UNRELATED)).status == "hit"

    asyncio.run(scenario())


def test_a_ttl_past_what_redis_can_expire_is_capped(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION, ttl_s=1e20)
            assert cache.available
            assert 0 < harness.direct.ttl(harness.key(cache, entry_id)) <= MAX_TTL_S
            assert (await harness.lookup(cache, PARAPHRASE)).status == "hit"

    asyncio.run(scenario())


def test_an_entry_gone_from_the_store_is_not_served(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION)
            harness.direct.delete(harness.key(cache, entry_id))  # expired in Redis before the index noticed
            assert (await harness.lookup(cache, QUESTION)).status == "miss"
            assert cache.index.get(entry_id) is None

    asyncio.run(scenario())


# -- quotas ---------------------------------------------------------------------------------------------------------

DISTINCT = ["What is the capital of France?", "How do I bake sourdough bread?", "Who painted the Mona Lisa?",
            "Give me tips to sleep better."]


def _quota_scenario(harness: Harness, eviction: str) -> Callable[[], object]:
    async def scenario() -> dict[str, bool]:
        cache = harness.cache(general_settings(quota=3, eviction=eviction))
        async with running(cache):
            first, second, third, fourth = DISTINCT
            ids = {text: await harness.store(cache, text) for text in (first, second, third)}
            # `first` is hit most but earliest; then `second` once, then `third` once.
            for text in (first, first, first, second, third):
                assert (await harness.lookup(cache, text)).status == "hit"
                await asyncio.sleep(0.01)
            ids[fourth] = await harness.store(cache, fourth)
            assert len(cache.index) == 3
            kept = {text: cache.index.get(entry_id) is not None for text, entry_id in ids.items()}
            for text, entry_id in ids.items():
                assert harness.direct.exists(harness.key(cache, entry_id)) == kept[text]
                assert (await harness.lookup(cache, text)).status == ("hit" if kept[text] else "miss")
            return kept

    return scenario


def test_quota_evicts_the_least_recently_used(harness: Harness) -> None:
    kept = asyncio.run(_quota_scenario(harness, "lru")())
    assert kept == dict.fromkeys(DISTINCT, True) | {DISTINCT[0]: False}


def test_quota_evicts_the_least_frequently_used(harness: Harness) -> None:
    kept = asyncio.run(_quota_scenario(harness, "lfu")())
    # The entry hit three times survives; of those hit once the older goes; the new entry is not its own victim.
    assert kept == dict.fromkeys(DISTINCT, True) | {DISTINCT[1]: False}


MANY = ["Who wrote Pride and Prejudice?", "How far is the Moon from the Earth?", "Give me tips to sleep better.",
        "What is photosynthesis?", "Recommend a good book for a long flight.", "How does a vaccine work?",
        "Write a short poem about autumn.", "Which river is the longest in Europe?", "How do I bake sourdough bread?",
        "What language is spoken in Brazil?"]


def test_evicted_slots_are_reused_and_the_survivors_stay_findable(harness: Harness) -> None:
    async def scenario() -> None:
        cache = harness.cache(general_settings(quota=3))
        async with running(cache):
            for i, text in enumerate(MANY):
                await harness.store(cache, text)
                survivors = MANY[max(0, i - 2):i + 1]
                assert len(cache.index) == len(survivors) and len(harness.keys("*:entry:*")) == len(survivors)
                for kept in survivors:
                    result = await harness.lookup(cache, kept)
                    assert result.status == "hit" and result.entry.query == kept
                for gone in MANY[:max(0, i - 2)]:
                    assert (await harness.lookup(cache, gone)).status == "miss"

    asyncio.run(scenario())


def test_the_embedded_store_caches_too(embed) -> None:
    async def scenario() -> None:
        cache = SemanticCache(SemanticCacheSettings(), MemoryAnswerStore(), embed(["x"]).shape[1], embed,
                              SemanticCacheMetrics(CollectorRegistry()))
        query = Harness.query(QUESTION)
        async with running(cache):
            miss = await cache.lookup(query, embed([QUESTION])[0])
            assert miss.status == "miss"
            await cache.put(query, embed([QUESTION])[0], miss.category, ANSWER)
            other = await cache.lookup(Harness.query(UNRELATED), embed([UNRELATED])[0])
            await cache.put(Harness.query(UNRELATED, ttl_s=0.2), embed([UNRELATED])[0], other.category, ANSWER)
            hit = await cache.lookup(Harness.query(PARAPHRASE), embed([PARAPHRASE])[0])
            assert hit.status == "hit" and hit.entry.response == ANSWER
            await asyncio.sleep(0.25)
            assert (await cache.lookup(Harness.query(UNRELATED), embed([UNRELATED])[0])).status == "miss"
            assert cache.stats()["store"] == "memory" and cache.stats()["entries"] == 1

    asyncio.run(scenario())


# -- tenants, restarts and replicas ---------------------------------------------------------------------------------


def test_restart_rebuilds_the_index_from_redis(harness: Harness) -> None:
    async def scenario() -> None:
        first = harness.cache()
        async with running(first):
            entry_id = await harness.store(first, QUESTION)
            assert (await harness.lookup(first, QUESTION)).status == "hit"
            # The hit is recorded in the store in the background.
            await eventually(lambda: harness.direct.hget(harness.key(first, entry_id), "hits") == b"1")
        restarted = harness.cache()
        assert len(restarted.index) == 0
        async with running(restarted):
            assert len(restarted.index) == 1 and restarted.index.get(entry_id).hits == 1
            hit = await harness.lookup(restarted, PARAPHRASE)
            assert hit.status == "hit" and hit.entry.entry_id == entry_id

    asyncio.run(scenario())


def test_replicas_sharing_redis_see_each_others_entries_and_deletions(harness: Harness) -> None:
    async def scenario() -> None:
        one, two = harness.cache(), harness.cache()
        async with running(one, two):
            entry_id = await harness.store(one, QUESTION)
            await eventually(lambda: two.index.get(entry_id) is not None)
            hit = await harness.lookup(two, PARAPHRASE)
            assert hit.status == "hit" and hit.entry.entry_id == entry_id
            # An entry the second replica stores reaches the first.
            other = await harness.store(two, UNRELATED)
            await eventually(lambda: one.index.get(other) is not None)
            # Deletions travel too.
            assert await one.invalidate(entry_id=entry_id) == 1
            await eventually(lambda: two.index.get(entry_id) is None)
            assert (await harness.lookup(two, QUESTION)).status == "miss"
            assert (await harness.lookup(two, UNRELATED)).status == "hit"

    asyncio.run(scenario())


# -- damage ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("response", b'{"content": "Poisoned answer.", "finish_reason": "stop", "usage": null}'),
    ("response", b"{not json"),
    ("digest", b"0123456789abcdef0123456789abcdef"),
    ("embedding", b"\x00" * 10),
    ("tenant", b"tenant-b"),
])
def test_corrupt_entries_are_dropped_not_served(harness: Harness, field: str, value: bytes) -> None:
    async def scenario() -> None:
        cache = harness.cache()
        async with running(cache):
            entry_id = await harness.store(cache, QUESTION)
            key = harness.key(cache, entry_id)
            harness.direct.hset(key, field, value)
            result = await harness.lookup(cache, QUESTION)
            assert result.status == "miss" and result.entry is None
            await eventually(lambda: not harness.direct.exists(key))
            assert cache.index.get(entry_id) is None
            assert harness.metric(cache, "blendgate_semantic_cache_evictions_total", category="factual",
                                  reason="corrupt") == 1
            # The cache keeps working: the question is answered and stored again.
            await harness.store(cache, QUESTION)
            assert (await harness.lookup(cache, QUESTION)).status == "hit"

    asyncio.run(scenario())


def test_corrupt_entries_found_at_start_up_are_dropped(harness: Harness) -> None:
    async def scenario() -> None:
        first = harness.cache()
        async with running(first):
            bad = await harness.store(first, QUESTION)
            good = await harness.store(first, UNRELATED)
        harness.direct.hset(harness.key(first, bad), "response", b'{"content": "Poisoned."}')
        restarted = harness.cache()
        async with running(restarted):
            assert restarted.index.get(bad) is None and restarted.index.get(good) is not None
            assert not harness.direct.exists(harness.key(first, bad))
            assert (await harness.lookup(restarted, QUESTION)).status == "miss"

    asyncio.run(scenario())


def test_a_key_that_is_not_a_hash_is_dropped_and_the_cache_stays_up(harness: Harness) -> None:
    async def scenario() -> None:
        first = harness.cache()
        async with running(first):
            entry_id = await harness.store(first, QUESTION)
            key = harness.key(first, entry_id)
            harness.direct.delete(key)
            harness.direct.set(key, "not a hash")
            result = await harness.lookup(first, QUESTION)
            assert result.status == "miss" and first.available
            await eventually(lambda: not harness.direct.exists(key))
            # Found by the start-up scan instead: dropped there, and the cache comes up.
            harness.direct.set(key, "not a hash")
        restarted = harness.cache()
        async with running(restarted):
            assert restarted.available and len(restarted.index) == 0
            assert not harness.direct.exists(key)

    asyncio.run(scenario())


def test_entries_of_another_embedder_are_purged(harness: Harness) -> None:
    async def scenario() -> None:
        old = harness.cache(namespace="old-embedder")
        async with running(old):
            await harness.store(old, QUESTION)
        neighbour = harness.cache(prefix=harness.prefix + "-neighbour", namespace="old-embedder")
        async with running(neighbour):
            await harness.store(neighbour, QUESTION)
        assert harness.keys("old-embedder:*")  # the entry and the change stream
        new = harness.cache(namespace="new-embedder")
        assert isinstance(new.store, RedisAnswerStore)
        async with running(new):
            assert harness.keys("old-embedder:*") == []
            assert len(new.index) == 0 and (await harness.lookup(new, QUESTION)).status == "miss"
            await harness.store(new, QUESTION)
        # Another deployment's prefix is left alone.
        assert list(harness.direct.scan_iter(f"{harness.prefix}-neighbour:*"))
        store = RedisAnswerStore(harness.redis.url, harness.prefix, "new-embedder", 1.0)
        try:
            assert await store.purge_other_namespaces() == 0
        finally:
            await store.close()

    asyncio.run(scenario())


# -- Redis outages --------------------------------------------------------------------------------------------------


def test_redis_down_bypasses_quickly_and_the_cache_recovers(fresh_redis: RedisServer, embed, prefix: str) -> None:
    harness = Harness(fresh_redis, embed, prefix)
    settings = SemanticCacheSettings(redis_url=fresh_redis.url, redis_retry_s=0.2)

    async def scenario() -> None:
        cache = harness.cache(settings)
        async with running(cache):
            await harness.store(cache, QUESTION)
            assert (await harness.lookup(cache, PARAPHRASE)).status == "hit"
            fresh_redis.stop()
            for text in (PARAPHRASE, UNRELATED, PARAPHRASE):
                started = time.monotonic()
                result = await harness.lookup(cache, text)
                assert time.monotonic() - started < 1.0
                assert (result.status, result.reason) == ("bypass", "store_unavailable")
            assert not cache.available and cache.down_reason
            assert harness.metric(cache, "blendgate_semantic_cache_store_up") == 0
            # Counted under whichever call met the outage first (this lookup's fetch, or the replica sync).
            registry = harness.registries[id(cache)]
            assert sum(s.value for m in registry.collect() for s in m.samples
                       if s.name == "blendgate_semantic_cache_store_errors_total") >= 1
            started = time.monotonic()
            assert await cache.put(harness.query(UNRELATED), harness.vector(UNRELATED), "factual", ANSWER) is None
            assert time.monotonic() - started < 1.0
            # A replica that starts while Redis is down comes up without the cache.
            late = harness.cache(settings)
            started = time.monotonic()
            await late.start()
            try:
                assert time.monotonic() - started < 2.0 and not late.available
                assert (await harness.lookup(late, QUESTION)).reason == "store_unavailable"
                fresh_redis.start()  # empty: a cache-only Redis loses its entries when it dies
                await eventually(lambda: cache.available and late.available)
                assert harness.metric(cache, "blendgate_semantic_cache_store_up") == 1
                assert (await harness.lookup(cache, PARAPHRASE)).status == "miss"
                entry_id = await harness.store(cache, QUESTION)
                assert (await harness.lookup(cache, PARAPHRASE)).status == "hit"
                await eventually(lambda: late.index.get(entry_id) is not None)
                assert (await harness.lookup(late, PARAPHRASE)).status == "hit"
            finally:
                await late.close()

    asyncio.run(scenario())


def test_a_hung_redis_times_out_instead_of_holding_requests(fresh_redis: RedisServer, embed, prefix: str) -> None:
    harness = Harness(fresh_redis, embed, prefix)
    settings = SemanticCacheSettings(redis_url=fresh_redis.url, redis_retry_s=0.2, redis_timeout_ms=100)

    async def scenario() -> None:
        cache = harness.cache(settings)
        async with running(cache):
            first = await harness.store(cache, QUESTION, "first answer")
            second = await harness.store(cache, UNRELATED, "second answer")
            fresh_redis.pause()
            try:
                started = time.monotonic()
                result = await harness.lookup(cache, PARAPHRASE)
                assert time.monotonic() - started < 1.0
                assert (result.status, result.reason) == ("bypass", "store_unavailable")
                assert await cache.put(harness.query("Who painted the Mona Lisa?"),
                                       harness.vector("Who painted the Mona Lisa?"), "factual", ANSWER) is None
                assert time.monotonic() - started < 2.0
            finally:
                fresh_redis.resume()
            # Back: every entry answers with its own answer (no reply meant for a timed-out call is read).
            await eventually(lambda: cache.available)
            for text, entry_id, content in ((UNRELATED, second, "second answer"), (PARAPHRASE, first, "first answer"),
                                            (UNRELATED, second, "second answer")):
                hit = await harness.lookup(cache, text)
                assert hit.status == "hit" and hit.entry.entry_id == entry_id
                assert hit.entry.response["content"] == content

    asyncio.run(scenario())


def store_errors(harness: Harness, cache: SemanticCache) -> float:
    registry = harness.registries[id(cache)]
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == "blendgate_semantic_cache_store_errors_total")


def test_a_redis_restart_costs_one_outage_and_one_rebuild(fresh_redis: RedisServer, embed, prefix: str) -> None:
    """Pooled connections the restart closed are replaced on first use, not reported as a new outage each."""
    harness = Harness(fresh_redis, embed, prefix)
    # A store that is up answers within the timeout even on a busy 2-core machine (16 connections opened at once
    # missed the default 100 ms there); a stopped one refuses connections at once, whatever the timeout.
    settings = general_settings().model_copy(update={"redis_url": fresh_redis.url, "redis_retry_s": 0.2,
                                                     "redis_timeout_ms": 2000})
    questions = [f"What is fact number {i} about the river {name}?" for i, name in
                 enumerate(("Nile", "Amazon", "Danube", "Rhine", "Volga", "Thames", "Seine", "Loire", "Elbe", "Po",
                            "Tiber", "Ganges", "Indus", "Mekong", "Yukon", "Congo"))]

    async def traffic(cache: SemanticCache) -> list[str | None]:
        """Concurrent stores (each on a pooled connection of its own), then a lookup of each."""
        stored = await asyncio.gather(*(cache.put(harness.query(q), harness.vector(q), "general", ANSWER)
                                        for q in questions))
        hits = await asyncio.gather(*(harness.lookup(cache, q) for q in questions))
        assert [h.status for h in hits] == ["hit"] * len(questions) or not all(stored)
        return stored

    async def scenario() -> None:
        cache = harness.cache(settings)
        async with running(cache):
            for restart in range(3):
                assert all(await traffic(cache))
                await asyncio.sleep(SYNC_INTERVAL_S * 2)  # the replica's sync has read those changes
                fresh_redis.stop()
                assert not any(await traffic(cache))  # down: bypassed, nothing stored
                assert not cache.available
                fresh_redis.start()  # empty: a cache-only Redis loses its entries when it dies
                await eventually(lambda: cache.available)
                errors = store_errors(harness, cache)
                for _ in range(3):  # every pooled connection the restart closed is used again
                    assert all(await traffic(cache))
                    assert cache.available
                assert store_errors(harness, cache) == errors, f"restart {restart}: the cache failed again"
                assert len(cache.index) == len(questions)  # entries lost with Redis's data left the index
            # One rebuild at start and one per restart (its data was lost), none for a stale connection.
            assert harness.metric(cache, "blendgate_semantic_cache_rebuilds_total", reason="start") == 1
            assert harness.metric(cache, "blendgate_semantic_cache_rebuilds_total", reason="lost_changes") == 3

    asyncio.run(scenario())


def test_a_timeout_catches_up_from_the_change_stream_without_a_rebuild(fresh_redis: RedisServer, embed,
                                                                       prefix: str) -> None:
    harness = Harness(fresh_redis, embed, prefix)
    settings = SemanticCacheSettings(redis_url=fresh_redis.url, redis_retry_s=0.2, redis_timeout_ms=100)

    async def scenario() -> None:
        one, two = harness.cache(settings), harness.cache(settings)
        async with running(one, two):
            kept = await harness.store(one, QUESTION)
            doomed = await harness.store(one, "Who wrote War and Peace?")
            await eventually(lambda: two.index.get(doomed) is not None)
            index = one.index
            fresh_redis.pause()  # Redis is slow: calls time out, the data stays
            try:
                assert (await harness.lookup(one, PARAPHRASE)).reason == "store_unavailable"
                assert not one.available
                # Dropped while the store is away: the delete is sent when it answers.
                assert await one.invalidate(entry_id=doomed) == 1
            finally:
                fresh_redis.resume()
            await eventually(lambda: one.available and two.available)
            # A change made by the other replica after the outage arrives through the stream.
            other = await harness.store(two, UNRELATED)
            await eventually(lambda: one.index.get(other) is not None)
            assert one.index is index and one.index.get(kept) is not None  # caught up, not rebuilt
            assert harness.metric(one, "blendgate_semantic_cache_rebuilds_total", reason="start") == 1
            assert harness.metric(one, "blendgate_semantic_cache_rebuilds_total", reason="lost_changes") is None
            assert (await harness.lookup(one, PARAPHRASE)).entry.entry_id == kept
            # The delete made while Redis hung reached Redis and the other replica.
            assert harness.direct.exists(harness.key(one, doomed)) == 0
            await eventually(lambda: two.index.get(doomed) is None)

    asyncio.run(scenario())


# -- load-adaptive policy -------------------------------------------------------------------------------------------


def test_load_loosens_the_threshold_and_lengthens_the_ttl(harness: Harness) -> None:
    # "capital city" is a looser paraphrase (cosine ~0.96): under the strict bar, above the loaded one.
    loose = "what is the capital city of France?"
    settings = general_settings(threshold=0.99, threshold_under_load=0.9, ttl_s=100, ttl_under_load_s=300)
    load = LoadMonitor(LoadSettings(queue_depth_mark=2, latency_mark_ms=60_000))
    depth = [0]
    load.watch_queue(MODEL, lambda: depth[0])

    async def scenario() -> None:
        cache = harness.cache(settings, load=load)
        async with running(cache):
            calm = await harness.store(cache, QUESTION)
            assert 0 < harness.direct.pttl(harness.key(cache, calm)) <= 100_000
            assert (await harness.lookup(cache, loose)).status == "miss"
            depth[0] = 4  # twice the mark: full load
            loaded = await harness.lookup(cache, loose)
            assert loaded.status == "hit" and loaded.policy.threshold == pytest.approx(0.9)
            busy = await cache.put(harness.query(UNRELATED), harness.vector(UNRELATED), "general", ANSWER)
            assert 100_000 < harness.direct.pttl(harness.key(cache, busy)) <= 300_000
            report = cache.effective_policies([MODEL])[MODEL]
            assert report["load"]["level"] == 1.0 and report["categories"][0]["ttl_s"] == 300
            depth[0] = 3  # half way
            assert cache.policy_for(MODEL, "general").threshold == pytest.approx(0.945)
            depth[0] = 1  # load falls: the configured values return
            assert (await harness.lookup(cache, loose)).status == "miss"
            assert cache.policy_for(MODEL, "general").ttl_s == 100

    asyncio.run(scenario())


@pytest.mark.parametrize("mode, labels", [
    ("name", {"tenant-a": {"tenant": "tenant-a"}, "tenant-b": {"tenant": "tenant-b"}}),
    ("hash", {"tenant-a": {"tenant": "80a707af7dc7"}, "tenant-b": {"tenant": "df6b6a5f230e"}}),  # sha256[:12]
    ("drop", {"tenant-a": {}, "tenant-b": {}}),
])
def test_the_tenant_label_is_the_name_a_hash_or_nothing(embed, mode: str, labels: dict) -> None:
    async def scenario() -> None:
        registry = CollectorRegistry()
        cache = SemanticCache(SemanticCacheSettings(), MemoryAnswerStore(), embed(["x"]).shape[1], embed,
                              SemanticCacheMetrics(registry, TenantLabel(mode)))
        async with running(cache):
            for tenant, question in (("tenant-a", QUESTION), ("tenant-b", QUESTION)):
                query = CacheQuery(tenant=tenant, model=MODEL, text=question, context="ctx-1")
                result = await cache.lookup(query, embed([question])[0])
                assert await cache.put(query, embed([question])[0], result.category, ANSWER) is not None
        factual = {"category": "factual"}

        def value(name: str, tenant: str, **extra: str) -> float | None:
            return registry.get_sample_value(name, {**factual, **labels[tenant], **extra})

        # Per tenant, or all tenants together when the label is dropped.
        together = mode == "drop"
        assert value("blendgate_semantic_cache_lookups_total", "tenant-a", result="miss") == (2 if together else 1)
        assert value("blendgate_semantic_cache_stores_total", "tenant-b") == (2 if together else 1)
        assert value("blendgate_semantic_cache_entries", "tenant-a") == (2 if together else 1)
        names = {sample.labels.get("tenant") for family in registry.collect() for sample in family.samples}
        assert names - {None} == {label["tenant"] for label in labels.values() if label}

    asyncio.run(scenario())
