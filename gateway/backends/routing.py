"""Which SGLang worker gets a request: cache affinity that every gateway replica computes alike, with a load bound.

A worker keeps the chunk-caches of the chunks it prefilled (in its GPU, then CPU tiers), so a request is
cheapest on the worker that prefilled its chunks before. Several gateway replicas send to the same workers, so
where a chunk set goes must not depend on what one replica happens to remember: each request goes to the
home of its first chunk (the best-ranked document, first in the prompt), by rendezvous (highest random
weight) hashing over the healthy workers: every worker gets a score hash(worker URL, chunk digest) and the
highest wins. Every replica configured with the same worker URLs picks the same worker for the same chunks,
with no state shared; when a worker leaves, only the requests it was home to move (each to its next-highest
worker), and when it comes back they return. Requests without chunks, and any request whose home has
`max_imbalance` more requests in flight than the least busy worker (a popular document set must not pin all
traffic to one GPU), go to the least busy worker. SGLang's own router is cache-aware by prompt prefix; this is
keyed by chunks, since blending reuses chunks anywhere in the prompt. Plain Python, no I/O: the backend
reports health and outcomes into it.
"""


from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..redaction import redact_url


def rendezvous_score(worker_url: str, key: str) -> int:
    """The worker's rendezvous score for a key (64 bits of BLAKE2b over both): the same in every process."""
    return int.from_bytes(hashlib.blake2b(f"{worker_url}\0{key}".encode(), digest_size=8).digest(), "big")


@dataclass
class WorkerState:
    url: str
    healthy: bool = True  # optimistic until the first health check says otherwise
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None

    @property
    def name(self) -> str:
        """The URL as shown in /healthz, logs and errors: without a password (redaction.redact_url)."""
        return redact_url(self.url)

    def report(self) -> dict:
        return {"url": self.name, "healthy": self.healthy, "in_flight": self.in_flight, "requests": self.requests,
                "failures": self.failures, "last_error": self.last_error}


class AffinityRouter:
    def __init__(self, urls: list[str], max_imbalance: int = 4) -> None:
        self.workers = {url: WorkerState(url) for url in urls}
        self.max_imbalance = max_imbalance

    def healthy(self) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.healthy]

    def home(self, digests: list[str], exclude: set[str] = frozenset()) -> WorkerState | None:
        """The healthy worker (not excluded) that the chunk set's first chunk hashes to; None without chunks
        or workers."""
        candidates = [w for w in self.healthy() if w.url not in exclude]
        if not digests or not candidates:
            return None
        return max(candidates, key=lambda w: rendezvous_score(w.url, digests[0]))

    def choose(self, digests: list[str], exclude: set[str] = frozenset()) -> WorkerState | None:
        """The worker for a request with these chunk digests (in prompt order), or None when no healthy worker is
        left. `exclude`: workers already tried for this request (refused connections)."""
        candidates = [w for w in self.healthy() if w.url not in exclude]
        if not candidates:
            return None
        # Among equals, the one that has served fewer requests: new work spreads over the workers.
        least_busy = min(candidates, key=lambda w: (w.in_flight, w.requests))
        home = self.home(digests, exclude)
        if home is None or home.in_flight - least_busy.in_flight > self.max_imbalance:
            return least_busy
        return home

    def started(self, worker: WorkerState) -> None:
        """The worker accepted a request."""
        worker.in_flight += 1
        worker.requests += 1

    def finished(self, worker: WorkerState) -> None:
        worker.in_flight -= 1

    def mark(self, worker: WorkerState, healthy: bool, error: str | None = None) -> None:
        if not healthy:
            worker.failures += 1
            worker.last_error = error
        worker.healthy = healthy

    def report(self) -> list[dict]:
        return [w.report() for w in self.workers.values()]
