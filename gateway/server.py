"""The HTTP server: uvicorn's, draining on SIGTERM before it stops (gateway/lifecycle.py)."""

from __future__ import annotations

import logging
import threading

import uvicorn

from .lifecycle import Lifecycle

log = logging.getLogger("blendgate.gateway")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT: /healthz says "draining" at once, requests
    are still served for `drain_delay_s`, then uvicorn's graceful shutdown (the listener closed, requests in
    flight given the config's `timeout_graceful_shutdown`). A second signal ends the delay at once; a third is
    uvicorn's forced exit."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle, self.drain_delay_s = lifecycle, drain_delay_s
        self.delay: threading.Timer | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if not self.lifecycle.draining:
            self.lifecycle.begin_drain()
            log.info("draining: /healthz answers 503; the listener closes in %.1f s", self.drain_delay_s)
            if self.drain_delay_s > 0:
                # uvicorn's handler only sets flags its main loop polls: safe from this timer's thread.
                self.delay = threading.Timer(self.drain_delay_s, super().handle_exit, (sig, None))
                self.delay.daemon = True
                self.delay.start()
                return
        elif self.delay is not None and self.delay.is_alive():
            self.delay.cancel()
            self.delay = None
        super().handle_exit(sig, frame)
