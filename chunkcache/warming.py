"""How often chunks a full-prefill fallback left uncached may be computed while requests are being served (plain
Python, no torch).

ChunkBlender.warm computes such a chunk with a forward pass of its own, on the same GPU and stream as the
requests. Between decode steps that pass delays every running request's next token: on the H200 inside SGLang
(2026-12-02, bench/results/load-2026-12-02.md), warming one chunk after every pass took the inter-token latency's
median from ~6 ms to 42 ms. WarmPacer spaces warms so that under load they take at most `share` of the time: after
a warm that took t seconds, the next may start t * (1 - share) / share seconds later (0.1: one 50 ms warm per
0.5 s). An idle engine warms without pacing (nothing waits on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

# The share of serving time warming may take under load.
DEFAULT_WARM_SHARE = 0.1


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
