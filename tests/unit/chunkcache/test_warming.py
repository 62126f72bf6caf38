"""The warm queue's order (chunkcache/warming.py: WarmQueue), plain Python."""

from __future__ import annotations

import numpy as np
import pytest
from blendgate.chunkcache.warming import WarmQueue


def test_the_most_missed_chunk_is_warmed_first_then_the_most_recently_missed() -> None:
    queue: WarmQueue[str, int] = WarmQueue(8)
    for key in ("rare", "popular", "other", "popular", "popular", "other"):
        queue.missed(key, len(key))
    assert queue.misses("popular") == 3 and queue.misses("absent") == 0
    assert [queue.pop()[0] for _ in range(3)] == ["popular", "other", "rare"]
    queue.missed("a", 1)
    queue.missed("b", 1)
    assert queue.pop() == ("b", 1)  # a tie: the most recent miss first
    queue.pop()
    with pytest.raises(KeyError):
        queue.pop()


def test_past_its_capacity_the_least_missed_chunk_is_dropped() -> None:
    queue: WarmQueue[str, None] = WarmQueue(2)
    for key in ("hot", "hot", "once", "new"):
        queue.missed(key, None)
    assert "hot" in queue and "new" in queue and "once" not in queue and len(queue) == 2
    with pytest.raises(ValueError):
        WarmQueue(0)


def test_under_a_zipf_workload_the_popular_chunks_are_warmed_first() -> None:
    """The workload of bench/load.py (Zipf 1.1 over 2,000 chunks, 8 a prompt), 50 misses for every warm: the
    first 100 chunks warmed are nearly all among the 200 most popular. (The first version warmed the oldest
    queued chunk and moved a chunk missed again to the back, so the popular ones never came first.)"""
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 2001) ** 1.1
    picks = rng.choice(2000, size=(100, 50), p=weights / weights.sum())
    queue: WarmQueue[int, None] = WarmQueue(256)
    warmed: list[int] = []
    for misses in picks:
        for chunk in misses:
            if chunk not in warmed:
                queue.missed(int(chunk), None)
        warmed.append(queue.pop()[0])
    assert sum(chunk < 200 for chunk in warmed) >= 90
