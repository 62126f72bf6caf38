"""The QQP mode of the semantic cache benchmark (bench/semcache_qqp.py): the real `SemanticCache` on the
embedded store decides, on hand-made pairs whose embeddings are given (no model), and the counting, the
bootstrap and the static thresholds are checked against counts worked out by hand."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from bench_modules import bench_module
from blendgate.semcache.settings import CategoryPolicy, SemanticCacheSettings

qqp = bench_module("semcache_qqp.py")

DIMENSION = 8


def unit(*weights: float) -> np.ndarray:
    vector = np.zeros(DIMENSION, dtype=np.float32)
    vector[:len(weights)] = weights
    return vector / np.linalg.norm(vector)


def at_cosine(cosine: float) -> np.ndarray:
    """A unit vector at `cosine` to unit(1)."""
    return unit(cosine, float(np.sqrt(1 - cosine ** 2)))


# (pair, second question's vector). Every first question is unit(1) but pair 5's, which is orthogonal to it;
# pair 5's second question is unit(1): it would hit the earlier pairs' entries if they were not dropped.
PAIRS = [
    (qqp.QqpPair(1, "Which is the tallest mountain?", "What is the highest mountain?", True), at_cosine(0.95)),
    (qqp.QqpPair(2, "How do you learn Python?", "How do you learn Java?", False), at_cosine(0.95)),
    (qqp.QqpPair(3, "What causes rain?", "Why is the sky blue?", False), at_cosine(0.3)),
    (qqp.QqpPair(4, "Who wrote Hamlet?", "Which author wrote the play Hamlet?", True), at_cosine(0.5)),
    (qqp.QqpPair(5, "Where is Lima?", "In which country is the city of Lima?", True), unit(1)),
]


def vectors() -> dict[str, np.ndarray]:
    table = {}
    for pair, second in PAIRS:
        table[pair.first] = unit(0, 0, 1) if pair.pair_id == 5 else unit(1)
        table[pair.second] = second
    return table


def test_false_hits_are_written_for_auditing(tmp_path) -> None:
    outcomes = [qqp.PairOutcome(pair, status, "factual", 0.9, True, 0.1)
                for (pair, _), status in zip(PAIRS, ["hit", "hit", "miss", "miss", "hit"])]
    path = tmp_path / "false-hits.tsv"
    assert qqp.write_false_hits(outcomes, np.array([0.95, 0.95, 0.3, 0.5, 1.0]), path) == 1  # pair 2 only
    header, row = [line.split("\t") for line in path.read_text().splitlines()]
    assert header == ["id", "category", "cosine", "first", "second"]
    assert row == ["2", "factual", "0.9500", "How do you learn Python?", "How do you learn Java?"]


def test_counting_through_the_real_cache() -> None:
    table = vectors()
    policy = CategoryPolicy(name="all", threshold=0.9, examples=["any question"])
    # The verifier off: this counts what the cache serves (its guards would refuse pair 2's Python/Java).
    settings = SemanticCacheSettings(categories=[policy], default_category="all", neighbour_margin=0.0,
                                     verifier=False)

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack([table.get(text, unit(0, 0, 0, 0, 0, 0, 0, 1)) for text in texts])

    async def scenario() -> list:
        cache = qqp.default_cache(settings, DIMENSION, embed)
        await cache.start()
        outcomes = await qqp.cache_outcomes(cache, [pair for pair, _ in PAIRS], lambda text: table[text])
        assert len(cache.index) == 0  # every entry dropped after its pair
        await cache.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [o.status for o in outcomes] == ["hit", "hit", "miss", "miss", "miss"]
    assert all(o.stored and o.category == "all" and o.threshold == 0.9 for o in outcomes)
    served = np.array([o.served for o in outcomes])
    duplicate = np.array([o.pair.duplicate for o in outcomes])
    rates = qqp.rates(served, duplicate, resamples=500)
    assert (rates.pairs, rates.duplicates, rates.true_hits, rates.false_hits) == (5, 3, 1, 1)
    assert rates.duplicate_hit_rate == pytest.approx(1 / 3)
    assert rates.false_share == pytest.approx(0.5)
    assert rates.duplicate_interval[0] <= 1 / 3 <= rates.duplicate_interval[1]
    assert rates.false_interval[0] <= 0.5 <= rates.false_interval[1]
    # The pair cosines the static baselines use: the ones the vectors were built with.
    cosines = qqp.pair_cosines([pair for pair, _ in PAIRS], lambda text: table[text])
    assert cosines[:4] == pytest.approx([0.95, 0.95, 0.3, 0.5], abs=1e-5)


def test_static_thresholds() -> None:
    cosines = np.array([0.90, 0.99, 0.95, 0.97, 0.93])
    duplicate = np.array([False, True, True, False, True])
    # Ranked: 0.99 dup, 0.97 non, 0.95 dup, 0.93 dup, 0.90 non -> false shares 0, 1/2, 1/3, 1/4, 2/5.
    assert qqp.tuned_threshold(cosines, duplicate, 0.34) == 0.93
    assert qqp.tuned_threshold(cosines, duplicate, 0.2) == 0.99
    assert qqp.tuned_threshold(cosines, ~duplicate, 0.0) is None  # the most similar pair is a false hit
    assert qqp.same_rate_threshold(cosines, duplicate, 2 / 3) == 0.95
    assert qqp.same_rate_threshold(cosines, duplicate, 0.5) == 0.95
    versus = qqp.compare_false_hits(cosines >= 0.99, cosines >= 0.90, duplicate, resamples=200)
    assert (versus.mine, versus.theirs, versus.ratio) == (0, 2, 0.0)
    assert versus.difference_interval[0] <= -2 <= versus.difference_interval[1] <= 0
    assert qqp.compare_false_hits(cosines >= 0.99, cosines >= 0.99, duplicate, resamples=200).ratio is None


def test_split_and_balance() -> None:
    pairs = [qqp.QqpPair(i, f"q{i}a", f"q{i}b", i % 3 == 0) for i in range(1, 61)]
    tune, held_out = qqp.split_held_out(pairs)
    assert {p.pair_id for p in held_out} == set(range(5, 61, 5)) and len(tune) + len(held_out) == 60
    chosen = qqp.balanced(tune)
    assert sum(p.duplicate for p in chosen) == sum(not p.duplicate for p in chosen) == sum(p.duplicate for p in tune)
    assert qqp.balanced(tune, seed=0) == chosen and len(qqp.balanced(tune, per_class=4)) == 8


def test_settings_overrides() -> None:
    settings = qqp.settings_with(["candidates=4"], ["threshold=0.98", "ttl_s=60"])
    assert settings.candidates == 4
    assert all(c.threshold == 0.98 and c.ttl_s == 60 for c in settings.categories)
    assert [c.name for c in settings.categories] == [c.name for c in SemanticCacheSettings().categories]
    assert qqp.settings_with([], []) == SemanticCacheSettings()
    with pytest.raises(ValueError):
        qqp.settings_with(["no_such_setting=1"], [])  # pydantic's ValidationError is a ValueError
    with pytest.raises(ValueError):
        qqp.settings_with([], ["threshold"])
