"""The process's run state: the hand-off between the server runner (cli.serve, which gets the signals) and the
routes (/healthz), so that a gateway told to stop says so before it stops listening.

On SIGTERM (or SIGINT) the gateway drains: `Lifecycle.begin_drain` makes /healthz answer 503 "draining" at once
(a load balancer or Kubernetes readiness probe stops sending new requests), requests keep being served for
`shutdown.drain_delay_s` (the time routing takes to notice), then uvicorn's graceful shutdown closes the
listener and waits up to `shutdown.grace_s` for the requests in flight (streams included) to finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Lifecycle:
    draining: bool = False
    drain_started: float | None = None  # time.monotonic() when the drain began

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining, self.drain_started = True, time.monotonic()
