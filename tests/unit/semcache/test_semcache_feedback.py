"""Learning from false-hit reports (semcache/feedback.py): the rule's arithmetic on the learner alone (how far a
report raises the thresholds, how they relax, per tenant and category, bounded memory), then in a real cache
(all-MiniLM-L6-v2, the default verifier, the embedded store): a reported paraphrase is refused afterwards,
concurrent hits and reports keep exact counts, and the learned figures reach /metrics' collector and the
admin stats."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from blendgate.semcache.answer_store import MemoryAnswerStore
from blendgate.semcache.bound import wilson_upper
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.feedback import MARGIN, NO_RAISE, FeedbackLearner, ServedHit
from blendgate.semcache.lookup import CacheQuery
from blendgate.semcache.metrics import SemanticCacheMetrics, TenantLabel
from blendgate.semcache.policy import CachePolicy, LoadMonitor
from blendgate.semcache.settings import CategoryPolicy, FeedbackSettings, LoadSettings, SemanticCacheSettings
from prometheus_client import CollectorRegistry

ANSWER = {"content": "Paris.", "finish_reason": "stop",
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
QUESTION = "What is the capital of France?"
PARAPHRASE = "What's the capital of France?"


def policy(bound: float = 0.02, threshold: float = 0.9) -> CachePolicy:
    categories = [CategoryPolicy(name="factual", rules=["."], threshold=threshold, false_hit_bound=bound),
                  CategoryPolicy(name="code", rules=["def "], threshold=0.96, false_hit_bound=bound)]
    return CachePolicy(categories, LoadMonitor(LoadSettings()))


def learner(bound: float = 0.02, verifier: dict[str, float | None] | None = None,
            **settings: object) -> FeedbackLearner:
    return FeedbackLearner(FeedbackSettings(**settings), policy(bound), verifier)


def hit(tenant: str = "acme", category: str = "factual", similarity: float = 0.95, probability: float | None = 0.8,
        cosine_threshold: float = 0.9, probability_threshold: float | None = 0.6, exact: bool = False) -> ServedHit:
    return ServedHit(tenant, category, similarity, cosine_threshold, probability, probability_threshold, exact)


# -- the rule ---------------------------------------------------------------------------------------------------

def test_a_report_past_the_bound_raises_each_threshold_by_its_step_at_most() -> None:
    learned = learner(verifier={"factual": 0.6, "code": None})
    for i in range(9):
        learned.served(f"e{i}", hit())
    outcome = learned.report("e8", "acme", "factual")
    # 1 report in 9 hits: the upper bound is far past 2%. The hit cleared the cosine threshold by 0.05 and the
    # probability threshold by 0.2, more than a step: each rises by its step (0.01, 0.05).
    assert outcome.matched and outcome.raised
    assert outcome.learned.cosine == pytest.approx(0.01) and outcome.learned.probability == pytest.approx(0.05)
    assert learned.learned("acme", "factual") == outcome.learned
    # The thresholds a lookup uses now: the verifier's 0.6 plus the raise.
    assert learned.probability_threshold("factual", outcome.learned) == pytest.approx(0.65)
    # A hit that cleared the thresholds in force by less than a step raises them to just past it.
    learned.served("close", hit(similarity=0.913, cosine_threshold=0.91, probability=0.66, probability_threshold=0.65))
    narrow = learned.report("close", "acme", "factual").learned
    assert narrow.cosine == pytest.approx(0.01 + 0.003 + MARGIN)
    assert narrow.probability == pytest.approx(0.05 + 0.01 + MARGIN)
    # Raises stop at their ceilings: 0.05 of cosine, a probability threshold of 0.99.
    for i in range(20):
        learned.served(f"x{i}", hit(similarity=0.99, probability=0.999, cosine_threshold=0.9,
                                    probability_threshold=0.6))
        learned.report(f"x{i}", "acme", "factual")
    capped = learned.learned("acme", "factual")
    assert capped.cosine == pytest.approx(0.05) and 0.6 + capped.probability == pytest.approx(0.99)


def test_reports_within_the_bound_or_unmatched_or_of_the_same_question_raise_nothing() -> None:
    learned = learner(bound=0.05)
    for i in range(2000):
        learned.served(f"e{i}", hit(probability=None, probability_threshold=None))
    state = learned.partitions[("acme", "factual")]
    assert state.window_hits == pytest.approx(2000 * (1 - (1 - 1 / 2000) ** 2000), rel=1e-6)
    outcome = learned.report("e1999", "acme", "factual")  # 1 in ~1264 weighted hits: within 5%
    assert outcome.matched and not outcome.raised and outcome.learned == NO_RAISE
    assert wilson_upper(1, round(state.window_hits)) < 0.05
    # Unknown entry (served elsewhere, or long ago): counted, nothing moves.
    fresh = learner()
    fresh.served("seen", hit())
    unknown = fresh.report("never-served", "acme", "factual")
    assert not unknown.matched and not unknown.raised and fresh.partitions[("acme", "factual")].reports == 1
    # The same question repeated: the answer was wrong, not the match; no threshold would have refused it.
    fresh.served("exact", hit(similarity=1.0, probability=None, probability_threshold=None, exact=True))
    assert fresh.report("exact", "acme", "factual").learned == NO_RAISE
    # A report names a served hit once: a second report of it is not matched again.
    fresh.served("twice", hit())
    assert fresh.report("twice", "acme", "factual").matched
    assert not fresh.report("twice", "acme", "factual").matched


def test_raises_relax_by_half_every_half_life_while_within_the_bound() -> None:
    learned = learner(bound=0.05, relax_half_life_hits=100, window_hits=1000)
    for i in range(10):
        learned.served(f"e{i}", hit(probability=None, probability_threshold=None))
    assert learned.report("e9", "acme", "factual").learned.cosine == pytest.approx(0.01)
    state = learned.partitions[("acme", "factual")]
    # While the windowed upper bound is past 5%, hits do not relax the raise ...
    relaxing = 0
    for i in range(400):
        within = wilson_upper(state.window_reports * (1 - 1 / 1000),
                              state.window_hits * (1 - 1 / 1000) + 1) <= 0.05
        before = state.cosine_raise
        learned.served(f"n{i}", hit(probability=None, probability_threshold=None))
        if within:
            relaxing += 1
            assert state.cosine_raise == pytest.approx(before * 0.5 ** (1 / 100))
        else:
            assert state.cosine_raise == before
    # ... and once within, it halves every 100 such hits, back toward the configured threshold.
    assert 0 < relaxing < 400
    assert state.cosine_raise == pytest.approx(0.01 * 0.5 ** (relaxing / 100))
    for i in range(2000):
        learned.served(f"m{i}", hit(probability=None, probability_threshold=None))
    assert learned.learned("acme", "factual") == NO_RAISE  # below 1e-4: dropped


def test_learning_is_per_tenant_and_category_and_bounded() -> None:
    learned = learner(verifier={"factual": None, "code": 0.7}, max_partitions=3, recent_hits=5)
    learned.served("a", hit())
    learned.report("a", "acme", "factual")
    assert learned.learned("acme", "factual").cosine > 0
    assert learned.learned("globex", "factual") == NO_RAISE and learned.learned("acme", "code") == NO_RAISE
    # Guards alone decide "factual" (no verifier threshold): the raise starts from 0.
    assert learned.probability_threshold("factual", learned.learned("acme", "factual")) == pytest.approx(0.05)
    assert learned.probability_threshold("code", NO_RAISE) is None
    # A report naming another partition's entry does not take that hit's values.
    learned.served("b", hit(tenant="globex"))
    assert not learned.report("b", "acme", "code").matched
    # At most 3 partitions and 5 recent hits are kept.
    for i in range(10):
        learned.served(f"t{i}", hit(tenant=f"tenant-{i}"))
    assert len(learned.partitions) == 3 and len(learned.recent) == 5
    # The operators' view: every cached category, with each tenant's breakdown.
    shown = {c.category: c for c in learned.categories()}
    assert set(shown) == {"factual", "code"}
    assert shown["code"].verifier_threshold == pytest.approx(0.7) and shown["code"].hits == 0
    assert shown["code"].share is None and shown["code"].upper is None


def unit(vector: np.ndarray) -> np.ndarray:
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_a_reported_entrys_near_duplicates_need_a_nearer_question() -> None:
    learned = learner(reported_neighbourhoods=2)
    reported = unit(np.array([1.0, 0.0, 0.0]))
    learned.served("e", hit(similarity=0.95))
    learned.report("e", "acme", "factual", owner="", vector=reported)
    near = unit(np.array([1.0, 0.05, 0.0]))  # cosine 0.9988 to the reported entry: a near-duplicate
    asked_at = unit(np.array([0.95, np.sqrt(1 - 0.95 ** 2), 0.0]))  # where the wrongly served question lay
    assert learned.refused_nearby("acme", "factual", "", near, 0.95)  # no nearer than the reported question
    assert learned.refused_nearby("acme", "factual", "", near, 0.95 + MARGIN / 2)
    assert not learned.refused_nearby("acme", "factual", "", near, 0.95 + MARGIN)  # nearer: served
    # The wrongly served question's own entry (at 0.95 from the reported one) is outside the neighbourhood.
    assert not learned.refused_nearby("acme", "factual", "", asked_at, 0.9)
    # Another owner, tenant or category: nothing remembered there.
    assert not learned.refused_nearby("acme", "factual", "user-hash", near, 0.95)
    assert not learned.refused_nearby("globex", "factual", "", near, 0.95)
    assert not learned.refused_nearby("acme", "code", "", near, 0.95)
    # The same question repeated teaches no neighbourhood; the newest 2 are kept per owner.
    learned.served("x", hit(similarity=1.0, exact=True))
    learned.report("x", "acme", "factual", owner="", vector=reported)
    assert len(learned.neighbourhoods[("acme", "factual", "")]) == 1
    for i in range(3):
        learned.served(f"n{i}", hit())
        learned.report(f"n{i}", "acme", "factual", owner="", vector=unit(np.array([0.0, 1.0, float(i)])))
    assert len(learned.neighbourhoods[("acme", "factual", "")]) == 2
    assert not learned.refused_nearby("acme", "factual", "", near, 0.95)  # the oldest went


# -- in a real cache ------------------------------------------------------------------------------------------------

def _cache(embedder, threshold: float, verifier: bool = True, tenant_label: str = "name", **feedback: object):
    settings = SemanticCacheSettings(categories=[CategoryPolicy(name="general", rules=["."], threshold=threshold)],
                                     default_category="general", verifier=verifier, feedback=feedback)
    registry = CollectorRegistry()
    cache = SemanticCache(settings, MemoryAnswerStore(), embedder.dimension, embedder.embed,
                          SemanticCacheMetrics(registry, TenantLabel(tenant_label)))
    return cache, registry


def _query(text: str, tenant: str = "acme") -> CacheQuery:
    return CacheQuery(tenant=tenant, model="m", text=text, context="c", user="u")


def test_a_reported_paraphrase_is_refused_afterwards(embedder) -> None:
    question, paraphrase = embedder.embed([QUESTION])[0], embedder.embed([PARAPHRASE])[0]
    similarity = float(question @ paraphrase)
    # The threshold just under the pair's similarity: the paraphrase is served until a report.
    cache, registry = _cache(embedder, threshold=round(similarity - 0.0004, 4))

    async def scenario():
        await cache.start()
        try:
            assert await cache.put(_query(QUESTION), question, "general", ANSWER)
            served = await cache.lookup(_query(PARAPHRASE), paraphrase)
            assert served.status == "hit", served.report()
            tenant, category = cache.category_of(served.entry.entry_id)
            outcome = cache.learn_false_hit(served.entry.entry_id, tenant, category)
            assert await cache.invalidate(entry_id=served.entry.entry_id, tenant=tenant) == 1
            # The same answer stored again: the paraphrase no longer clears the raised similarity threshold.
            assert await cache.put(_query(QUESTION), question, "general", ANSWER)
            again = await cache.lookup(_query(PARAPHRASE), paraphrase)
            other_tenant = None
            if await cache.put(_query(QUESTION, "globex"), question, "general", ANSWER):
                other_tenant = await cache.lookup(_query(PARAPHRASE, "globex"), paraphrase)
            return served, outcome, again, other_tenant
        finally:
            await cache.close()

    served, outcome, again, other_tenant = asyncio.run(scenario())
    threshold = cache.settings.categories[0].threshold
    assert outcome.matched and outcome.raised
    assert outcome.learned.cosine == pytest.approx(served.similarity - threshold + MARGIN, abs=1e-6)
    assert again.status == "miss" and again.similarity == pytest.approx(served.similarity, abs=1e-5)
    assert other_tenant is not None and other_tenant.status == "hit"  # another tenant learnt nothing
    labels = {"category": "general", "tenant": "acme"}
    assert registry.get_sample_value("blendgate_semantic_cache_learned_threshold", labels) == pytest.approx(
        threshold + outcome.learned.cosine)
    assert registry.get_sample_value("blendgate_semantic_cache_reported_false_share", labels) == 1.0
    assert registry.get_sample_value("blendgate_semantic_cache_reported_false_upper", labels) > 0.02
    assert registry.get_sample_value("blendgate_semantic_cache_learned_verifier_threshold", labels) is not None
    assert registry.get_sample_value("blendgate_semantic_cache_learned_threshold",
                                     {"category": "general", "tenant": "globex"}) == pytest.approx(threshold)
    shown = cache.stats()["feedback"]["categories"][0]
    assert shown["category"] == "general" and shown["bound"] == 0.02 and shown["reports"] == 1
    assert shown["hits"] == 2 and shown["reported_false_share"] == 0.5
    assert {t["tenant"]: t["reports"] for t in shown["tenants"]} == {"acme": 1, "globex": 0}
    assert shown["cosine_threshold"] == pytest.approx(threshold + outcome.learned.cosine, abs=1e-4)


def test_the_reported_entrys_question_stored_again_is_not_served_to_the_reported_question(embedder) -> None:
    question, paraphrase = embedder.embed([QUESTION])[0], embedder.embed([PARAPHRASE])[0]
    # No threshold raise: only the reported entry's neighbourhood refuses.
    cache, registry = _cache(embedder, threshold=0.8, cosine_step=0.0, probability_step=0.0)

    async def scenario():
        await cache.start()
        try:
            first = await cache.put(_query(QUESTION), question, "general", ANSWER)
            served = await cache.lookup(_query(PARAPHRASE), paraphrase)
            assert served.status == "hit" and served.entry.entry_id == first, served.report()
            assert cache.learn_false_hit(first, "acme", "general").matched
            await cache.invalidate(entry_id=first, tenant="acme")
            assert await cache.put(_query(QUESTION), question, "general", ANSWER)  # the same question again
            refused = await cache.lookup(_query(PARAPHRASE), paraphrase)
            repeated = await cache.lookup(_query(QUESTION), question)
            # The reported question gets its own answer, which serves it from then on.
            assert await cache.put(_query(PARAPHRASE), paraphrase, "general", ANSWER)
            own = await cache.lookup(_query(PARAPHRASE), paraphrase)
            return refused, repeated, own
        finally:
            await cache.close()

    refused, repeated, own = asyncio.run(scenario())
    assert cache.feedback.learned("acme", "general") == NO_RAISE
    assert refused.status == "miss" and repeated.status == "hit" and own.status == "hit"
    assert own.similarity >= 0.9999
    assert registry.get_sample_value("blendgate_semantic_cache_verifier_rejections_total",
                                     {"category": "general", "reason": "feedback"}) == 1


def test_concurrent_hits_and_reports_keep_exact_counts(embedder) -> None:
    questions = [f"What is the boiling point of liquid number {i} at sea level?" for i in range(12)]
    vectors = embedder.embed(questions)
    cache, registry = _cache(embedder, threshold=0.9, verifier=False, tenant_label="drop")

    async def scenario():
        await cache.start()
        try:
            ids = [await cache.put(_query(q), v, "general", ANSWER) for q, v in zip(questions, vectors)]
            # Every question asked three times at once, and every entry reported as soon as it is served.
            results = await asyncio.gather(*(cache.lookup(_query(q), v)
                                             for q, v in zip(questions * 3, list(vectors) * 3)))

            async def report(entry_id: str):
                await asyncio.sleep(0)
                where = cache.category_of(entry_id)
                return cache.learn_false_hit(entry_id, *where) if where is not None else None

            outcomes = await asyncio.gather(*(report(i) for i in ids), *(report(i) for i in ids))
            return ids, results, outcomes
        finally:
            await cache.close()

    ids, results, outcomes = asyncio.run(scenario())
    assert all(r.status == "hit" for r in results)
    state = cache.feedback.partitions[("acme", "general")]
    assert state.hits == 36 and state.reports == 24  # each served hit counted once, each report once
    assert sum(o.matched for o in outcomes) == 12  # the latest hit of each entry, matched once
    # The same question repeated: nothing to learn on the thresholds.
    assert cache.feedback.learned("acme", "general") == NO_RAISE
    assert registry.get_sample_value("blendgate_semantic_cache_reported_false_share",
                                     {"category": "general"}) == pytest.approx(24 / 36)


def test_feedback_can_be_turned_off(embedder) -> None:
    settings = SemanticCacheSettings(categories=[CategoryPolicy(name="general", rules=["."])],
                                     default_category="general", feedback={"enabled": False})
    registry = CollectorRegistry()
    cache = SemanticCache(settings, MemoryAnswerStore(), embedder.dimension, embedder.embed,
                          SemanticCacheMetrics(registry))
    assert cache.feedback is None and cache.stats()["feedback"] is None
    assert cache.learn_false_hit("any", "acme", "general") is None
    assert registry.get_sample_value("blendgate_semantic_cache_learned_threshold", {"category": "general"}) is None
