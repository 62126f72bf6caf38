"""Recent history of the admin overview's counters, kept by the gateway so the admin UI's charts have data the
moment the page opens (GET /admin/api/stats/history) instead of starting empty and filling at its own pace."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Callable

from ..semcache.tasks import cancel_and_wait

log = logging.getLogger("blendgate.gateway")

SAMPLE_INTERVAL_S = 5.0
KEPT_SAMPLES = 120  # ten minutes at SAMPLE_INTERVAL_S, as far back as the UI's charts reach


def chart_fields(stats: dict[str, Any]) -> dict[str, Any]:
    """The part of a /admin/api/stats snapshot the charts draw: its time, requests (total and by route) and
    each cache layer's lookups and hits."""
    layers = stats.get("layers", {})
    return {"time": stats["time"],
            "requests": {"total": stats["requests"]["total"], "by_route": stats["requests"]["by_route"]},
            "layers": {name: {"lookups": layers[name]["lookups"], "hits": layers[name]["hits"]}
                       for name in ("semantic_cache", "chunk_cache") if name in layers}}


class StatsHistory:
    """Samples `snapshot()` every `interval_s` seconds while started, keeping the last `kept` samples (the
    chart fields only: a sample is about 300 bytes)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], interval_s: float = SAMPLE_INTERVAL_S,
                 kept: int = KEPT_SAMPLES) -> None:
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.samples: deque[dict[str, Any]] = deque(maxlen=kept)
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        self.samples.append(chart_fields(self.snapshot()))

    def recent(self) -> list[dict[str, Any]]:
        """The samples kept, oldest first."""
        return list(self.samples)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a failed sample leaves a gap in the charts, never stops the sampling
                log.exception("admin stats history: sampling failed")
            await asyncio.sleep(self.interval_s)
