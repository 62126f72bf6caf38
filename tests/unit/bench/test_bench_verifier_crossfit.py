"""bench/verifier_crossfit.py's counting: the guards' table and the false hits at a share of duplicates served,
on hand-made pairs and scores worked out by hand (no model)."""

from __future__ import annotations

import numpy as np
from bench_modules import bench_module
from blendgate.semcache.tuning import LabelledPair

crossfit = bench_module("verifier_crossfit.py")


def test_false_hits_at_the_highest_threshold_serving_enough_duplicates() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, -np.inf, -np.inf])
    duplicate = np.array([True, False, True, False, True, True, False])
    assert crossfit.false_hits_at(scores, duplicate, 1) == 0  # 0.9 serves one duplicate
    assert crossfit.false_hits_at(scores, duplicate, 2) == 1  # 0.8 serves both pairs at 0.8
    assert crossfit.false_hits_at(scores, duplicate, 3) == 2  # 0.6
    assert crossfit.false_hits_at(scores, duplicate, 9) == 2  # never served stays out


def test_guard_table_counts_candidates_above_the_floor() -> None:
    pairs = [LabelledPair("How do I convert MP4 to AVI?", "How can I convert AVI to MP4?", False),
             LabelledPair("How do I learn Python?", "How do I learn Java?", False),
             LabelledPair("How do I cook rice?", "How should I cook rice?", True),
             LabelledPair("What is 2 + 2?", "What is 2 + 3?", False)]  # below the floor
    rows = crossfit.guard_table(pairs, np.array([0.95, 0.93, 0.97, 0.80]), 0.89)
    assert rows[0] == "3 candidates at cosine >= 0.89, 33.3% of them duplicates"
    assert "| entities | yes | 1 | 0 (0%) |" in rows
    assert "| numbers | yes | 0 | 0 (0%) |" in rows
    assert "| exchanged: roles swapped around a direction word | yes | 1 | 0 (0%) |" in rows
    assert "| comparison | no (a feature) | 0 | 0 (0%) |" in rows
