"""bench/semcache_audit.py's counting: the shares an audit calls false per agreement threshold, and what auditing
every hit would keep (hand-made answers' cosines; no model)."""

from __future__ import annotations

import numpy as np
from bench_modules import bench_module

audit = bench_module("semcache_audit.py")

# Four duplicates and two non-duplicates, the answers' cosines.
COSINES = np.array([0.95, 0.85, 0.65, 0.55, 0.75, 0.45])
DUPLICATE = np.array([True, True, True, True, False, False])


def test_the_table_counts_false_alarms_and_catches_per_agreement() -> None:
    lines = audit.table("pairs", COSINES, DUPLICATE)
    assert lines[0].startswith("**pairs**: 4 duplicate and 2 non-duplicate pairs")
    row = next(line for line in lines if line.startswith("| 0.7 |"))
    # below 0.7: duplicates 0.65 and 0.55 (2 of 4), non-duplicates 0.45 (1 of 2)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "0.7" and cells[1].startswith("0.500 (") and cells[2].startswith("0.500 (")


def test_auditing_every_hit_keeps_those_at_or_above_the_agreement() -> None:
    row = next(line for line in audit.served_rows(COSINES, DUPLICATE) if line.startswith("| 0.7 |"))
    # kept: duplicates 0.95, 0.85 and the non-duplicate 0.75: 2 true hits, 1 false, a false share of 1/3
    assert row.startswith("| 0.7 | 2/4 | 1/2 | 0.333 (")


def test_the_interval_of_an_empty_set_is_a_dash() -> None:
    assert audit.interval(np.array([], dtype=bool)) == "-"
    assert audit.interval(np.array([True, True])) == "1.000 (1.000-1.000)"
