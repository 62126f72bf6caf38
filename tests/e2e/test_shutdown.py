"""SIGTERM drains a live gateway (gateway/lifecycle.py, gateway/server.py): /healthz says "draining" at once,
requests are still served during `shutdown.drain_delay_s`, a stream in flight finishes whole, then the listener
closes (nothing new is accepted) and the process ends once its shutdown completes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
from support import EMBEDDED, GatewayProcess

COUNTING = {"role": "user", "content": "Count from 1 to 2000, one number per line, without stopping."}
DRAIN_DELAY_S = 3.0


def test_sigterm_drains_readiness_first_then_the_listener_and_lets_a_stream_finish(workdir: Path,
                                                                                    model_cache_dir: Path) -> None:
    config = {"models": [{"name": EMBEDDED, "sampling_defaults": {"temperature": 0.0, "top_p": 1.0}}],
              "retrieval": {"data_dir": str(workdir / "drain-collections")},
              "shutdown": {"drain_delay_s": DRAIN_DELAY_S, "grace_s": 120}}
    gateway = GatewayProcess("drain", config, workdir, model_cache_dir).start()
    try:
        lines: list[str] = []
        first_token = threading.Event()

        def stream() -> None:
            body = {"model": EMBEDDED, "messages": [COUNTING], "max_tokens": 48, "stream": True}
            with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=body, timeout=180) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if '"content"' in line:
                        first_token.set()

        streaming = threading.Thread(target=stream)
        streaming.start()
        assert first_token.wait(120), gateway.log()
        gateway.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Readiness goes false at once ...
        while True:
            health = httpx.get(f"{gateway.url}/healthz", timeout=5)
            if health.json()["status"] == "draining":
                break
            assert time.monotonic() - signalled < 1.0, health.json()
            time.sleep(0.05)
        assert health.status_code == 503
        # ... while requests routed before the balancer noticed are still served.
        quick = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                           json={"model": EMBEDDED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
        assert quick.status_code == 200 and time.monotonic() - signalled < DRAIN_DELAY_S
        # After the delay, nothing new gets in.
        refused = False
        while time.monotonic() - signalled < DRAIN_DELAY_S + 10:
            try:
                httpx.get(f"{gateway.url}/healthz", timeout=2)
            except httpx.ConnectError:
                refused = True
                break
            time.sleep(0.1)
        assert refused, "the listener stayed open after the drain delay"
        assert time.monotonic() - signalled >= DRAIN_DELAY_S - 0.2
        # The stream that was in flight finished whole, and the process exits cleanly.
        streaming.join(180)
        assert not streaming.is_alive()
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]", events[-3:]
        finishes = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in events
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]]
        assert "length" in finishes or "stop" in finishes
        # uvicorn re-raises the signal it caught once it has shut down: the status a process manager expects.
        assert gateway.process.wait(timeout=60) in (0, -signal.SIGTERM), gateway.log()
        assert "Application shutdown complete" in gateway.log()
    finally:
        gateway.stop()
