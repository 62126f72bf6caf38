"""SpeCache's policy (engine/specache_policy.py): budgets from the settings, each step's selection (sinks,
recent window and top-k cover the context exactly when it fits the budget, never more pairs than the budget
otherwise), the prefetch hit rate's counts, and the GPU KV bytes the issue's bar counts (>= 8x smaller than
bf16 full KV at 32k tokens with the eightfold settings)."""

from __future__ import annotations

import pytest
from blendgate.engine.specache_policy import (
    QUANTISATION_GROUP,
    QUANTISATION_GROUPS,
    KVShape,
    PrefetchStats,
    RequestBudget,
    SpeCacheSettings,
    gpu_kv_bytes,
)
from blendgate.kernels.lowbit_keys import GROUP, GROUPS
from pydantic import ValidationError

LLAMA3_8B = KVShape(layers=32, kv_heads=8, head_dim=128)


def test_the_policy_and_the_quantiser_agree_on_the_group() -> None:
    assert QUANTISATION_GROUP == GROUP
    assert QUANTISATION_GROUPS == GROUPS


def test_the_group_is_a_setting_and_the_window_holds_two_groups() -> None:
    assert SpeCacheSettings().group == 32
    assert SpeCacheSettings(group=64, recent_tokens=128).group == 64
    with pytest.raises(ValidationError, match="two groups"):
        SpeCacheSettings(group=64)  # the default window of 64 holds one group of 64
    with pytest.raises(ValidationError):
        SpeCacheSettings(group=48, recent_tokens=128)


def test_the_bytes_count_low_bit_keys_scales_budget_and_residency() -> None:
    shape = KVShape(layers=2, kv_heads=4, head_dim=64)
    settings = SpeCacheSettings(gpu_budget_tokens=200, bits=1, group=64, recent_tokens=128)
    got = gpu_kv_bytes(settings, 1000, shape, new_tokens=24)
    heads = 2 * 4
    assert got.full == 1024 * 2 * heads * 64 * 2
    assert got.budget == 200 * 2 * heads * 64 * 2
    assert got.codes == heads * 1024 * 64 // 8  # 1 bit a channel, 16 groups of 64 tokens
    assert got.scales == heads * 16 * 64 * 4  # a float16 zero point and step per group and channel
    assert got.residency == heads * (200 - 4 - 128) * 8
    assert got.total == got.budget + got.codes + got.scales + got.residency
    with pytest.raises(ValueError, match="at least one prompt token"):
        gpu_kv_bytes(settings, 0, shape)


def test_the_eightfold_settings_pass_the_bar_at_32k_and_the_defaults_do_not() -> None:
    eightfold = SpeCacheSettings.eightfold(enabled=True)
    assert eightfold.enabled and (eightfold.bits, eightfold.group, eightfold.recent_tokens) == (1, 64, 128)
    for context in (16384, 32768, 65536):
        assert 9.0 < gpu_kv_bytes(eightfold, context, LLAMA3_8B).smaller < 9.2
    assert gpu_kv_bytes(SpeCacheSettings.eightfold(gpu_budget_fraction=1 / 20), 32768, LLAMA3_8B).smaller > 10
    assert gpu_kv_bytes(SpeCacheSettings(), 32768, LLAMA3_8B).smaller < 8  # 2-bit keys in groups of 32, 1/10
    # 2-bit keys cost 1/16 of the pair more than 1-bit ones at the same group and budget: under the bar
    assert gpu_kv_bytes(SpeCacheSettings.eightfold(bits=2), 32768, LLAMA3_8B).smaller < 8


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


def test_a_step_selects_its_share_of_the_top_k_slots_and_reads_them_all() -> None:
    budget = SpeCacheSettings(gpu_budget_tokens=164, selected_share=0.25).budget(32768)
    assert budget == RequestBudget(4, 64, 96, 24)
    scored = budget.select(1000)
    assert scored.scored and scored.top_k == 96 and scored.selected == 24 and scored.pairs == budget.tokens
    fitting = budget.select(100)  # 32 candidates fit the slots: all of them read, no scores
    assert not fitting.scored and fitting.top_k == fitting.selected == 32
    assert SpeCacheSettings(gpu_budget_tokens=164).budget(32768).selected == 96  # the default: every slot
    assert SpeCacheSettings(gpu_budget_tokens=69, selected_share=0.01).budget(100).selected == 1  # at least one
    with pytest.raises(ValidationError):
        SpeCacheSettings(selected_share=0)
    with pytest.raises(ValueError):
        RequestBudget(4, 64, 96, 97)


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
    eightfold = {"enabled": True, "bits": 1, "group": 64, "recent_tokens": 128, "gpu_budget_fraction": 0.0625}
    assert LocalModelConfig(name="m", specache=eightfold).specache == SpeCacheSettings.eightfold(enabled=True)
    with pytest.raises(ValidationError, match="two groups"):
        LocalModelConfig(name="m", specache={"enabled": True, "group": 64})
