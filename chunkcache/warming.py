"""How often chunks a full-prefill fallback left uncached may be computed while requests are being served (plain
Python, no torch).

ChunkBlender.warm computes such chunks (up to WARM_BATCH at a time, side by side in one forward pass where they
share a prefix) on the same GPU and stream as the requests. Between decode steps that pass delays every running
request's next token: on the H200 inside SGLang (2026-12-02, bench/results/load-2026-12-02.md), warming one chunk
after every pass took the inter-token latency's median from ~6 ms to 42 ms. WarmPacer spaces warms so that under
load they take at most `share` of the time: after a warm that took t seconds, the next may start t * (1 - share) /
share seconds later (0.1: one 50 ms warm per 0.5 s). An idle engine warms without pacing (nothing waits on it).

WarmQueue says which chunk goes first: the one the most fallbacks missed since it was queued (then the most
recently missed), so that under a skewed (Zipf) workload the chunks most prompts share are computed first. The
first version (2026-12-02) warmed the oldest queued chunk and moved a chunk missed again to the back: the popular
chunks, missed again and again, never reached the front, and on the H200 the paced plugin's chunk hit rate stayed
at 0.01 over 100 s of the load benchmark (bench/results/load-2026-12-02.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

# The share of serving time warming may take under load.
DEFAULT_WARM_SHARE = 0.1

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class WarmQueue(Generic[K, V]):
    """Chunks waiting to be computed, by key, each with what computing it needs (`V`) and how often a fallback
    missed it. `pop` returns the most missed (ties: the most recently missed); past `capacity` the least missed
    (ties: the least recently) is dropped. Plain Python; a few hundred entries, so a scan does."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the warm queue needs room for at least one chunk, got {capacity}")
        self.capacity = capacity
        self._entries: dict[K, tuple[int, int, V]] = {}  # key -> (misses, order of the last miss, value)
        self._order = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def missed(self, key: K, value: V) -> None:
        """A fallback found `key` uncached: queue it, or count one more miss."""
        self._order += 1
        misses = self._entries[key][0] + 1 if key in self._entries else 1
        self._entries[key] = (misses, self._order, value)
        if len(self._entries) > self.capacity:
            coldest = min(self._entries, key=lambda k: self._entries[k][:2])
            del self._entries[coldest]

    def misses(self, key: K) -> int:
        """How often `key` was missed since it was queued (0: not queued)."""
        return self._entries[key][0] if key in self._entries else 0

    def pop(self) -> tuple[K, V]:
        """The most missed chunk, removed from the queue. Raises KeyError when empty."""
        if not self._entries:
            raise KeyError("the warm queue is empty")
        hottest = max(self._entries, key=lambda k: self._entries[k][:2])
        return hottest, self._entries.pop(hottest)[2]


@dataclass
class WarmPacer:
    """`share` (0, 1]: the most of the time warms may take while requests are served; `clock`: seconds
    (time.monotonic). Raises ValueError for a share out of range."""

    share: float = DEFAULT_WARM_SHARE
    clock: Callable[[], float] = time.monotonic
    _next_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.share <= 1.0:
            raise ValueError(f"the warming share must be in (0, 1], got {self.share}")

    def due(self) -> bool:
        """Whether a warm may start now under load."""
        return self.clock() >= self._next_at

    def spent(self, seconds: float) -> None:
        """A warm that ended now took `seconds`: the next waits its share's worth."""
        self._next_at = self.clock() + max(0.0, seconds) * (1.0 - self.share) / self.share
