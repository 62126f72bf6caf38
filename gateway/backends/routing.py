"""Which SGLang worker gets a request: cache affinity with a load bound.

A worker keeps the chunk-caches of the chunks it prefilled (in its GPU, then CPU tiers), so a request whose
chunks a worker served recently is cheapest there. The router remembers, per worker, the digests of the chunks
it was sent (a bounded LRU), sends a request to the healthy worker holding most of its chunks, and falls back
to the least busy worker when that one has `max_imbalance` more requests in flight (a popular document set must
not pin all traffic to one GPU). Requests without chunks go to the least busy worker. Like SGLang's own router's
cache-aware policy, but keyed by chunks rather than by prompt prefixes, since blending reuses chunks anywhere in
the prompt. Plain Python, no I/O: the backend reports health and outcomes into it.
"""


from __future__ import annotations

from dataclasses import dataclass, field

from cachetools import LRUCache

from ..redaction import redact_url

# Chunk digests remembered per worker (SglangModelConfig.remembered_chunks).
DEFAULT_REMEMBERED_CHUNKS = 65536


@dataclass
class WorkerState:
    url: str
    healthy: bool = True  # optimistic until the first health check says otherwise
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    # Digests of the chunks it was sent, the least recently sent dropped past the router's bound.
    chunks: LRUCache[str, None] = field(default_factory=lambda: LRUCache(DEFAULT_REMEMBERED_CHUNKS))

    @property
    def name(self) -> str:
        """The URL as shown in /healthz, logs and errors: without a password (redaction.redact_url)."""
        return redact_url(self.url)

    def holds(self, digests: list[str]) -> int:
        return sum(digest in self.chunks for digest in digests)

    def report(self) -> dict:
        return {"url": self.name, "healthy": self.healthy, "in_flight": self.in_flight, "requests": self.requests,
                "failures": self.failures, "chunks_remembered": len(self.chunks), "last_error": self.last_error}


class AffinityRouter:
    def __init__(self, urls: list[str], max_imbalance: int = 4,
                 remembered_chunks: int = DEFAULT_REMEMBERED_CHUNKS) -> None:
        self.workers = {url: WorkerState(url, chunks=LRUCache(remembered_chunks)) for url in urls}
        self.max_imbalance = max_imbalance

    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.healthy]

    def choose(self, digests: list[str], exclude: set[str] = frozenset()) -> WorkerState | None:
        """The worker for a request with these chunk digests, or None when no healthy worker is left."""
        candidates = [w for w in self.healthy() if w.url not in exclude]
        if not candidates:
            return None
        # Among equals, the one that has served fewer requests: new work spreads over the workers.
        least_busy = min(candidates, key=lambda w: (w.in_flight, w.requests))
        if not digests:
            return least_busy
        best = max(candidates, key=lambda w: (w.holds(digests), -w.in_flight, -w.requests))
        if best.holds(digests) == 0 or best.in_flight - least_busy.in_flight > self.max_imbalance:
            return least_busy
        return best

    def started(self, worker: WorkerState, digests: list[str]) -> None:
        """The worker accepted a request: it now holds (or is computing) these chunks."""
        worker.in_flight += 1
        worker.requests += 1
        for digest in digests:
            worker.chunks[digest] = None  # the most recent now; past the bound the least recent goes

    def finished(self, worker: WorkerState) -> None:
        worker.in_flight -= 1

    def mark(self, worker: WorkerState, healthy: bool, error: str | None = None) -> None:
        if not healthy:
            worker.failures += 1
            worker.last_error = error
            if worker.healthy:
                # A restarted worker comes back with empty caches: forget what it held.
                worker.chunks.clear()
        worker.healthy = healthy

    def report(self) -> list[dict]:
        return [w.report() for w in self.workers.values()]
