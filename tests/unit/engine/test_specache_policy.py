"""SpeCache's policy (engine/specache_policy.py): budgets from the settings, each step's selection (sinks,
recent window and top-k cover the context exactly when it fits the budget, never more pairs than the budget
otherwise), and the prefetch hit rate's counts."""

from __future__ import annotations

import pytest
from blendgate.engine.specache_policy import QUANTISATION_GROUP, PrefetchStats, RequestBudget, SpeCacheSettings
from blendgate.kernels.lowbit_keys import GROUP
from pydantic import ValidationError


def test_the_policy_and_the_quantiser_agree_on_the_group() -> None:
    assert QUANTISATION_GROUP == GROUP


def test_settings_are_off_by_default_and_apply_to_long_contexts_only() -> None:
    assert not SpeCacheSettings().applies(100_000)
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1000)
    assert settings.applies(1000) and not settings.applies(999)


def test_budgets_come_from_tokens_or_a_fraction_and_hold_the_fixed_part() -> None:
    assert SpeCacheSettings(gpu_budget_fraction=0.125).budget(32768).tokens == 4096
    assert SpeCacheSettings(gpu_budget_tokens=1000).budget(32768) == RequestBudget(4, 64, 932)
    assert SpeCacheSettings().budget(100).tokens == 4 + 64 + 1  # never less than the fixed part and one pair
    with pytest.raises(ValidationError, match="larger than"):
        SpeCacheSettings(gpu_budget_tokens=60)
    with pytest.raises(ValidationError):
        SpeCacheSettings(recent_tokens=2 * QUANTISATION_GROUP - 1)


@pytest.mark.parametrize("length", [1, 3, 4, 50, 68, 100, 164, 165, 1000])
def test_a_selection_covers_a_fitting_context_and_stays_within_the_budget(length) -> None:
    budget = RequestBudget(sink_tokens=4, recent_tokens=64, top_k=96)
    selection = budget.select(length)
    assert selection.pairs == min(length, budget.tokens)
    fixed = selection.fixed_positions()
    assert len(fixed) == len(set(fixed)) and all(0 <= p < length for p in fixed)
    assert fixed == [*range(min(4, length)), *range(max(4, length - 64), length)]
    assert selection.scored == (length > budget.tokens)
    if not selection.scored:  # every candidate is read: the whole context
        assert selection.top_k == selection.candidates


def test_the_prefetch_hit_rate_counts_hits_of_the_wanted_pairs() -> None:
    stats = PrefetchStats()
    assert stats.hit_rate == 1.0
    stats.record(wanted=100, hits=90, copied=10)
    stats.record(wanted=100, hits=70, copied=30)
    assert stats.hit_rate == 0.8 and stats.copied == 40
    with pytest.raises(ValueError):
        stats.record(wanted=10, hits=11, copied=0)


def test_a_local_models_config_takes_specache_settings() -> None:
    from blendgate.gateway.config import LocalModelConfig

    assert not LocalModelConfig(name="m").specache.enabled
    config = LocalModelConfig(name="m", specache={"enabled": True, "gpu_budget_tokens": 2048, "bits": 1})
    assert config.specache.applies(4096) and config.specache.budget(32768).tokens == 2048
    with pytest.raises(ValidationError, match="gpu_budget_tokens"):
        LocalModelConfig(name="m", specache={"enabled": True, "gpu_budget_tokens": 10})
    with pytest.raises(ValidationError):
        LocalModelConfig(name="m", specache={"enabled": True, "budget": 10})  # unknown keys are refused
