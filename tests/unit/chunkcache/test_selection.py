"""Blending's selection policy in plain Python: rules, budgets, counts and the compute they cost."""

from __future__ import annotations

import pytest
from blendgate.chunkcache.selection import (
    SelectionRule,
    compute_share,
    selected_count,
    sink_count,
    targeted_count,
    uniform_counts,
)


def test_rules_refuse_settings_that_mean_nothing() -> None:
    for bad in ({"score": "loudness"}, {"layer": 0}, {"probe_layers": 0}, {"sink_tokens": -1}, {"gradual": 0.5},
                {"chunk_budget": "random"}, {"neighbours": -1}, {"drift_shift": -0.5}):
        with pytest.raises(ValueError):
            SelectionRule(**bad)


def test_query_aware_rules_select_before_layer_zero_and_deviation_rules_at_their_layer() -> None:
    assert SelectionRule("attention").query_aware and SelectionRule("attention").first_selective_layer() == 0
    assert SelectionRule("attention_value", layer=2).query_aware
    assert SelectionRule("attention_value", layer=2).first_selective_layer() == 2
    assert not SelectionRule("value", layer=3).query_aware
    assert SelectionRule("value", layer=3).first_selective_layer() == 3


@pytest.mark.parametrize("chunk_tokens, ratio, expected", [(100, 0.15, 15), (101, 0.15, 16), (7, 1.0, 7),
                                                           (7, 0.0, 0), (3, 0.01, 1)])
def test_the_selected_count_rounds_up_within_the_chunk_tokens(chunk_tokens, ratio, expected) -> None:
    assert selected_count(chunk_tokens, ratio) == expected


def test_a_targeted_budget_covers_its_share_of_the_score_with_the_fewest_tokens() -> None:
    scores = [5.0, 3.0, 1.0, 1.0]  # total 10
    assert targeted_count(scores, 0.5, cap=4) == (1, 0.5)
    assert targeted_count(scores, 0.8, cap=4) == (2, 0.8)
    assert targeted_count(scores, 0.85, cap=4) == (3, 0.9)
    assert targeted_count(scores, 1.0, cap=4) == (4, 1.0)
    # The cap wins over the target, and says how far it got.
    assert targeted_count(scores, 1.0, cap=2) == (2, 0.8)
    assert targeted_count([0.0, 0.0], 0.9, cap=2) == (0, 1.0)  # nothing to cover
    for target in (0.0, 1.5):
        with pytest.raises(ValueError):
            targeted_count(scores, target, cap=4)


def test_a_uniform_budget_follows_the_chunk_lengths_and_adds_up() -> None:
    assert uniform_counts([100, 100, 50], 25) == [10, 10, 5]
    assert sum(uniform_counts([7, 3, 11], 6)) == 6
    assert uniform_counts([2, 1], 3) == [2, 1]  # never more than a chunk has
    assert uniform_counts([], 0) == []


def test_the_compute_share_counts_the_layers_a_deviation_rule_runs_in_full() -> None:
    layers, tokens = 32, 4096
    count = selected_count(tokens, 0.15)
    # CacheBlend's value rule at layer 1: one full layer, then r of every other (the old "ideal" formula).
    assert compute_share(SelectionRule("value"), count, tokens, layers) == pytest.approx(
        (tokens + count * (layers - 1)) / (tokens * layers))
    assert compute_share(SelectionRule("attention"), count, tokens, layers) == pytest.approx(count / tokens)
    assert compute_share(SelectionRule("value", layer=4), count, tokens, layers) > compute_share(
        SelectionRule("value"), count, tokens, layers)
    assert compute_share(SelectionRule("value", gradual=2.0), count, tokens, layers) > compute_share(
        SelectionRule("value"), count, tokens, layers)
    assert compute_share(SelectionRule("value"), 0, tokens, layers) == 0.0
    assert compute_share(SelectionRule("value"), tokens, tokens, layers) == 1.0


def test_sinks_take_at_most_half_the_budget() -> None:
    rule = SelectionRule("attention", sink_tokens=4)
    assert sink_count(rule, 210, 10) == 4  # a 10-chunk prompt at r = 0.15: 40 of 210
    assert sink_count(rule, 6, 2) == 1  # two short chunks, 6 tokens to spend: 2 sinks, 4 for the question
    assert sink_count(rule, 1, 3) == 0 and sink_count(rule, 50, 0) == 0
    assert sink_count(SelectionRule("attention"), 210, 10) == 0


def test_a_strided_probe_runs_every_nth_layer_from_the_first() -> None:
    assert SelectionRule("attention").probe_layer_ids(6) == [0, 1, 2, 3, 4, 5]
    assert SelectionRule("attention", probe_stride=2).probe_layer_ids(6) == [0, 2, 4]
    assert SelectionRule("attention", probe_layers=4, probe_stride=3).probe_layer_ids(30) == [0, 3]
    with pytest.raises(ValueError, match="probe_stride"):
        SelectionRule("attention", probe_stride=0)
