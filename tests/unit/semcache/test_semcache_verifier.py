"""The verifier of candidate hits (semcache/verifier.py, verifier_training.py) and the false-hit bound
(semcache/bound.py): the shipped default weights on real paraphrases and near misses, training and its
file, calibration to a bound, and the verifier in a real cache's lookups (all-MiniLM-L6-v2, embedded store)
with its metrics and admin stats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from blendgate.semcache.answer_store import MemoryAnswerStore
from blendgate.semcache.bound import (
    CLOSEST_SLACK,
    COSINE_BINS,
    MIN_CALIBRATION_HITS,
    PROBABILITY_BINS,
    CalibrationTable,
    wilson_upper,
)
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.lookup import CacheQuery
from blendgate.semcache.metrics import SemanticCacheMetrics
from blendgate.semcache.settings import CategoryPolicy, SemanticCacheSettings, default_categories
from blendgate.semcache.tuning import LabelledPair
from blendgate.semcache.verifier import Verifier, VerifierFileError, VerifierModel, same_wording
from blendgate.semcache.verifier_training import fit_logistic, train_verifier
from prometheus_client import CollectorRegistry

ANSWER = {"content": "an answer", "finish_reason": "stop",
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@pytest.fixture(scope="module")
def default_verifier() -> Verifier:
    return Verifier.load(None, default_categories())


# -- the bound --------------------------------------------------------------------------------------------------

def test_wilson_upper_bound() -> None:
    assert wilson_upper(0, 100) == pytest.approx(0.0263, abs=1e-4)
    assert wilson_upper(5, 100) == pytest.approx(0.0985, abs=1e-3)
    assert wilson_upper(0, 0) == 1.0
    assert wilson_upper(10, 1000) < wilson_upper(1, 100)  # more pairs, tighter bound


def test_calibration_picks_the_lowest_probability_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    same = rng.random(20_000) < 0.5
    # Same-answer pairs score high, different ones low: a higher threshold leaves fewer false hits.
    probabilities = np.clip(np.where(same, rng.normal(0.8, 0.15, same.size), rng.normal(0.3, 0.15, same.size)),
                            0, 0.999)
    guarded = rng.random(same.size) < np.where(same, 0.1, 0.5)  # guards fire more often on different pairs
    table = CalibrationTable.from_pairs(np.full(same.size, 0.95), probabilities, guarded, same)
    loose, strict = table.calibrate("factual", 0.9, 0.05), table.calibrate("factual", 0.9, 0.01)
    assert loose.probability is not None and strict.probability is not None
    assert loose.probability < strict.probability and strict.upper <= 0.01 and loose.upper <= 0.05
    assert strict.estimate <= strict.upper and strict.hit_rate < loose.hit_rate < loose.unverified_hit_rate == 1.0
    assert loose.unverified_estimate == pytest.approx(0.5, abs=0.02)
    assert loose.met and strict.met
    # Out of reach: flagged as not met, at the loosest threshold whose upper bound comes within CLOSEST_SLACK
    # of the lowest, with its shares.
    unreachable = table.calibrate("factual", 0.9, 0.0001)
    assert not unreachable.met and unreachable.probability is not None and unreachable.upper > 0.0001
    assert 0 < unreachable.hit_rate < loose.unverified_hit_rate
    # Counted: the pairs no veto guard refuses (the verifier refuses those on their own).
    uppers = {k: wilson_upper(*_false_and_hits(probabilities[~guarded], same[~guarded], k / PROBABILITY_BINS))
              for k in range(PROBABILITY_BINS) if (probabilities[~guarded] >= k / PROBABILITY_BINS).any()}
    closest = min(k for k, upper in uppers.items() if upper <= min(uppers.values()) + CLOSEST_SLACK)
    assert unreachable.probability == closest / PROBABILITY_BINS and unreachable.upper == uppers[closest]
    # Pairs below a category's cosine threshold do not count for it: no threshold, the guards alone decide.
    assert table.calibrate("code", 0.96, 0.05).pairs == 0
    assert table.calibrate("code", 0.96, 0.05).probability is None
    restored = CalibrationTable.from_json(table.to_json())
    assert (restored.counts == table.counts).all() and restored.counts.shape == (COSINE_BINS, PROBABILITY_BINS, 2, 2)


def _table(*groups: tuple[float, int, int]) -> CalibrationTable:
    """Pairs at cosine 0.95, no guard fired: (probability, same-answer pairs, different-answer pairs) per group."""
    probabilities = np.concatenate([np.full(same + other, p) for p, same, other in groups])
    same = np.concatenate([np.r_[np.ones(s, bool), np.zeros(o, bool)] for _, s, o in groups])
    return CalibrationTable.from_pairs(np.full(same.size, 0.95), probabilities, np.zeros(same.size, bool), same)


def test_calibration_needs_enough_hits_behind_a_threshold() -> None:
    # 40 pairs at probability 0.955, all right (upper 6.3%), above 400 at 0.5 with 40 wrong (upper 11.5%): the
    # lowest upper bound sits on the 40, too few to trust; the threshold falls to the loosest with enough hits.
    lucky = _table((0.955, 40, 0), (0.5, 400, 40))
    closest = lucky.calibrate("factual", 0.9, 0.02)
    assert wilson_upper(0, 40) < wilson_upper(40, 480) - CLOSEST_SLACK and 40 < MIN_CALIBRATION_HITS
    assert not closest.met and closest.probability == 0.0 and closest.hit_rate == 1.0
    assert closest.upper == pytest.approx(wilson_upper(40, 480))
    # Enough right pairs at the top (upper 1.3% on 200): chosen, and the bound met.
    enough = _table((0.955, 200, 0), (0.5, 400, 40)).calibrate("factual", 0.9, 0.02)
    assert enough.met and enough.probability == 0.51 and enough.hit_rate == pytest.approx(200 / 600)  # lowest: 0.51
    # Fewer pairs in all than the floor: the loosest threshold alone is eligible, met if all of them hold it.
    few = _table((0.955, 20, 0), (0.5, 30, 0))
    assert few.calibrate("factual", 0.9, 0.1).probability == 0.0 and few.calibrate("factual", 0.9, 0.1).met
    assert few.calibrate("factual", 0.9, 0.02).probability == 0.0 and not few.calibrate("factual", 0.9, 0.02).met


def _false_and_hits(probabilities: np.ndarray, same: np.ndarray, threshold: float) -> tuple[int, int]:
    """False hits and hits of pairs whose probability bin starts at or above `threshold` (bins of 0.01)."""
    served = np.floor(probabilities * PROBABILITY_BINS) / PROBABILITY_BINS >= threshold - 1e-9
    return int((served & ~same).sum()), int(served.sum())


# -- training ---------------------------------------------------------------------------------------------------

def test_logistic_regression_finds_the_separating_direction() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 2))
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(scale=0.3, size=2000) > 0).astype(float)
    weights, bias = fit_logistic(x, y)
    assert weights[0] > 0 > weights[1] and abs(bias) < 0.5
    assert weights[0] / -weights[1] == pytest.approx(2.0, rel=0.25)


def test_a_trained_verifier_round_trips_through_its_file(tmp_path: Path) -> None:
    pairs, cosines = [], []
    for i in range(60):
        pairs.append(LabelledPair(f"How do I learn topic {i}?", f"How can I learn topic {i}?", True))
        pairs.append(LabelledPair(f"How do I learn Python {i}?", f"How do I learn Java {i + 1}?", False))
        cosines += [0.95, 0.9]
    model = train_verifier(pairs, np.array(cosines), "test pairs")
    path = tmp_path / "verifier.json"
    model.save(path)
    loaded = VerifierModel.load(path)
    assert loaded.source == "test pairs" and loaded.calibration.counts.sum() == 120
    categories = [CategoryPolicy(name="general", rules=["."], threshold=0.85, false_hit_bound=0.05)]
    verifier = Verifier(loaded, categories)
    assert verifier.verify("How can I learn topic 200?", "How do I learn topic 200?", 0.95, "general").accepted
    refused = verifier.verify("How do I learn Java 3?", "How do I learn Python 2?", 0.9, "general")
    assert not refused.accepted and refused.reason in ("numbers", "entities")


def test_a_bad_weights_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "verifier.json"
    path.write_text('{"features": ["cosine"], "weights": [1], "bias": 0, "mean": [0], "scale": [1], "calibration": []}')
    with pytest.raises(VerifierFileError, match="features"):
        VerifierModel.load(path)
    with pytest.raises(VerifierFileError):
        VerifierModel.load(tmp_path / "missing.json")


# -- the default weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, cached", [
    ("What's the capital of France?", "What is the capital of France?"),
    ("How can I learn Python quickly?", "How do I learn Python quickly?"),
    ("What are the best ways to lose weight?", "What is the best way to lose weight?"),
])
def test_default_verifier_accepts_paraphrases(default_verifier: Verifier, query: str, cached: str) -> None:
    verdict = default_verifier.verify(query, cached, 0.97, "factual")
    assert verdict.accepted, verdict


TRIVIAL_REPHRASINGS = [
    ("What's the capital of France?", "What is the capital of France?"),
    ("what is the capital of france", "What is the capital of France?"),
    ("WHAT IS THE CAPITAL OF FRANCE?", "What is the capital of France?"),
    ("Why don't cats like water?", "Why do not cats like water?"),
    ("How do I learn Python quickly!", "How do I learn Python quickly?"),
    ("What are the health benefits of apples, pears and plums?",
     "What are the health benefits of plums, pears and apples?"),
    ("Is it true that I'm too old to learn piano at 40?", "Is it true that I am too old to learn piano at 40?"),
]


@pytest.mark.parametrize("query, cached", TRIVIAL_REPHRASINGS)
def test_default_verifier_accepts_trivial_rephrasings_at_their_real_cosine(default_verifier: Verifier, embedder,
                                                                            query: str, cached: str) -> None:
    # QQP's different-answer pairs share most of their words: the verifier must not learn that near-identical
    # wording means another question (case, punctuation, contractions, the order of a list).
    vectors = embedder.embed([query, cached])
    cosine = float(vectors[0] @ vectors[1])
    for category in ("factual", "conversational"):
        verdict = default_verifier.verify(query, cached, cosine, category)
        assert verdict.accepted, (category, cosine, verdict)


@pytest.mark.parametrize("query, cached, reason", [
    ("How do I learn Java quickly?", "How do I learn Python quickly?", "entities"),
    ("Why can't I sleep at night?", "Why can I sleep at night?", "negation"),
    ("Is it safe to eat eggs during pregnancy?", "Is it not safe to eat eggs during pregnancy?", "negation"),
    ("What can I do with 5 years of experience?", "What can I do with 2 years of experience?", "numbers"),
    ("How do I install Python 2 on Ubuntu?", "How do I install Python 3 on Ubuntu?", "numbers"),
    ("Which is the best inpatient rehab center in Appling County?",
     "Which is the best inpatient rehab center in Towns County?", "entities"),
])
def test_default_verifier_refuses_near_misses_at_their_real_cosine(default_verifier: Verifier, embedder,
                                                                   query: str, cached: str, reason: str) -> None:
    # The number, name and negation guards refuse on their own in every category, whatever the probability
    # ("not safe" is at cosine 0.99, where the classifier alone would let it through).
    vectors = embedder.embed([query, cached])
    cosine = float(vectors[0] @ vectors[1])
    for category in default_verifier.thresholds:
        verdict = default_verifier.verify(query, cached, cosine, category)
        assert not verdict.accepted and verdict.reason == reason, (category, cosine, verdict)


@pytest.mark.parametrize("query, cached, reason", [
    ("How do I learn Java quickly?", "How do I learn Python quickly?", "entities"),
    ("Why can't I sleep at night?", "Why can I sleep at night?", "negation"),
    ("What can I do with 5 years of experience?", "What can I do with 2 years of experience?", "numbers"),
    # (The comparison guard is a feature only: as a veto it cost same-answer pairs without fewer false hits.)
])
def test_default_verifier_refuses_near_misses(default_verifier: Verifier, query: str, cached: str,
                                              reason: str) -> None:
    verdict = default_verifier.verify(query, cached, 0.93, "factual")
    assert not verdict.accepted and verdict.reason == reason, verdict


def test_default_calibration_holds_each_category_bound_or_the_tightest(default_verifier: Verifier) -> None:
    for name, calibration in default_verifier.calibrations.items():
        assert calibration.bound == 0.02 and calibration.pairs > 100
        assert default_verifier.thresholds[name] == calibration.probability
        if calibration.met:
            assert calibration.upper <= 0.02 and calibration.estimate < calibration.unverified_estimate
            assert 0 < calibration.hit_rate <= calibration.unverified_hit_rate
        else:  # QQP's labels put the false share of hits near 9% even at cosine 0.99: the closest threshold
            assert calibration.probability is not None and calibration.estimate > 0.02
            # ... serves no larger a false share than the cosine alone (the same where the classifier does not
            # pay: probability 0).
            assert calibration.estimate <= calibration.unverified_estimate
            assert 0 < calibration.hit_rate <= calibration.unverified_hit_rate


@pytest.mark.parametrize("query, cached, same", [
    ("What's the capital of France?", "What is the capital of France?", True),
    ("WHY CAN'T I SLEEP", "Why can not I sleep?", True),
    ("I'm sure they've left, aren't they?", "I am sure they have left, are not they", True),
    ("Why can't I sleep?", "Why can I sleep?", False),
    ("What is the capital of France?", "What is the capital city of France?", False),
])
def test_the_same_wording_passes_whatever_the_threshold(query: str, cached: str, same: bool) -> None:
    # Same words in the same order once case, punctuation and contractions are set aside: one question, even
    # where the probability asked is out of reach.
    verifier = Verifier.load(None, [CategoryPolicy(name="strict", rules=["."], verifier_threshold=1.0)])
    assert same_wording(query, cached) is same
    assert verifier.verify(query, cached, 0.95, "strict").accepted is same


def test_load_lowers_the_probability_a_candidate_needs_but_not_past_a_guard() -> None:
    categories = [CategoryPolicy(name="general", rules=["."], verifier_threshold=0.8)]
    verifier = Verifier.load(None, categories)
    added, swapped = ("What is the capital city of France?", "What is the capital of France?"), \
        ("What is the capital of Germany?", "What is the capital of France?")
    calm = verifier.verify(*added, 0.92, "general")
    assert not calm.accepted and calm.reason == "classifier" and 0.4 < calm.probability < 0.8
    # Half load: the bar is 0.8 * 0.5 = 0.4; full load: 0.
    assert verifier.verify(*added, 0.92, "general", load_level=0.5).accepted
    assert verifier.verify(*added, 0.92, "general", load_level=1.0).accepted
    # A candidate a veto guard fires on needs the full threshold at any load.
    loaded = verifier.verify(*swapped, 0.92, "general", load_level=1.0)
    assert not loaded.accepted and loaded.reason == "entities"


def test_a_fixed_verifier_threshold_overrides_the_calibrated_one() -> None:
    categories = [CategoryPolicy(name="general", rules=["."], verifier_threshold=0.0),
                  CategoryPolicy(name="strict", rules=["."], verifier_threshold=0.99)]
    verifier = Verifier.load(None, categories)
    assert verifier.thresholds == {"general": 0.0, "strict": 0.99}
    assert verifier.verify("How do I learn Java?", "How do I learn Python?", 0.9, "general").accepted
    refused = verifier.verify("How can I learn Python?", "How do I learn Python?", 0.95, "strict")
    assert not refused.accepted and refused.reason == "classifier"


# -- in a cache's lookups ----------------------------------------------------------------------------------------

def _cache(embedder, verifier: bool) -> tuple[SemanticCache, CollectorRegistry]:
    policy = CategoryPolicy(name="general", rules=["."], threshold=0.8, ttl_s=3600)
    settings = SemanticCacheSettings(categories=[policy], default_category="general", verifier=verifier)
    registry = CollectorRegistry()
    cache = SemanticCache(settings, MemoryAnswerStore(), embedder.dimension, embedder.embed,
                          SemanticCacheMetrics(registry))
    return cache, registry


def _query(text: str) -> CacheQuery:
    return CacheQuery(tenant="t", model="m", text=text, context="c", user="u")


async def _store_then_look_up(cache: SemanticCache, embedder, stored: str, asked: str):
    await cache.start()
    try:
        vector = embedder.embed([stored])[0]
        assert await cache.put(_query(stored), vector, "general", ANSWER) is not None
        return await cache.lookup(_query(asked), embedder.embed([asked])[0])
    finally:
        await cache.close()


def test_lookup_skips_a_candidate_the_verifier_refuses_and_counts_why(embedder) -> None:
    stored, asked = "What is the population of Canada in 2010?", "What is the population of Canada in 2020?"
    cache, registry = _cache(embedder, verifier=True)
    result = asyncio.run(_store_then_look_up(cache, embedder, stored, asked))
    assert result.similarity >= 0.8 and result.status == "miss"  # above the threshold, yet refused
    assert registry.get_sample_value("blendgate_semantic_cache_verifier_rejections_total",
                                     {"category": "general", "reason": "numbers"}) == 1
    assert registry.get_sample_value("blendgate_semantic_cache_false_hit_bound", {"category": "general"}) == 0.02
    calibration = cache.verifier.calibrations["general"]
    assert registry.get_sample_value("blendgate_semantic_cache_false_hit_estimate",
                                     {"category": "general"}) == calibration.estimate > 0
    assert registry.get_sample_value("blendgate_semantic_cache_false_hit_bound_met",
                                     {"category": "general"}) == float(calibration.met)
    stats = cache.stats()["verifier"]["categories"][0]
    assert stats["category"] == "general" and stats["bound"] == 0.02 and "hit_rate" in stats

    paraphrase = asyncio.run(_store_then_look_up(_cache(embedder, True)[0], embedder, stored,
                                                 "What was the population of Canada in 2010?"))
    assert paraphrase.status == "hit"

    cache, registry = _cache(embedder, verifier=False)
    assert asyncio.run(_store_then_look_up(cache, embedder, stored, asked)).status == "hit"
    assert cache.stats()["verifier"] is None
    assert registry.get_sample_value("blendgate_semantic_cache_false_hit_bound", {"category": "general"}) is None


def test_verifier_path_loads_the_operators_weights(tmp_path: Path, embedder) -> None:
    pairs = [LabelledPair(f"What is fact {i}?", f"Tell me fact {i}.", i % 2 == 0) for i in range(40)]
    path = tmp_path / "mine.json"
    train_verifier(pairs, np.linspace(0.8, 0.99, 40), "my pairs").save(path)
    policy = CategoryPolicy(name="general", rules=["."])
    settings = SemanticCacheSettings.model_validate({"categories": [policy.model_dump()], "default_category": "general",
                                                     "verifier": "on", "verifier_path": str(path)})
    cache = SemanticCache(settings, MemoryAnswerStore(), embedder.dimension, embedder.embed,
                          SemanticCacheMetrics(CollectorRegistry()))
    assert cache.verifier.model.source == "my pairs" and cache.stats()["verifier"]["source"] == "my pairs"
    off = SemanticCacheSettings.model_validate({"categories": [policy.model_dump()], "default_category": "general",
                                                "verifier": "off"})
    assert off.verifier is False
