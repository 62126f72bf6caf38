"""A rolling restart under load loses no request (issue 22): two gateway replicas behind a load balancer that
follows /healthz, as a Kubernetes Service follows readiness, are restarted one after the other (SIGTERM,
drained, started again on the same port) while a client keeps asking; every request gets its answer.

The balancer here is the test's own few lines: it sends each request to a replica whose last /healthz (polled
every 0.1 s) said ready, and retries a refused connection on another (nothing was accepted, so nothing runs
twice), which is what a proxy or a Service does. The gateway's part is to say "draining" before it stops
listening (shutdown.drain_delay_s) and to finish what it accepted."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import httpx
from support import EMBEDDED, GatewayProcess

POLL_S = 0.1


class Balancer:
    """Round robin over the replicas /healthz last called ready."""

    def __init__(self, replicas: list[GatewayProcess]) -> None:
        self.replicas = replicas
        self.ready: set[str] = {r.url for r in replicas}
        self.stopped = threading.Event()
        self.turn = itertools.count()
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()

    def _poll(self) -> None:
        while not self.stopped.is_set():
            for replica in self.replicas:
                try:
                    ok = httpx.get(f"{replica.url}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    ok = False
                (self.ready.add if ok else self.ready.discard)(replica.url)
            time.sleep(POLL_S)

    def post(self, path: str, body: dict) -> httpx.Response:
        for _ in range(50):
            ready = sorted(self.ready)
            if not ready:
                time.sleep(POLL_S)
                continue
            url = ready[next(self.turn) % len(ready)]
            try:
                return httpx.post(f"{url}{path}", json=body, timeout=120)
            except httpx.ConnectError:  # refused before anything was accepted: another replica
                time.sleep(POLL_S)
        raise AssertionError("no replica took the request")


def wait_for_answers(outcomes: list, count: int, timeout_s: float = 120) -> None:
    """Until the load has `count` outcomes (answers or failures)."""
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < count:
        assert time.monotonic() < deadline, f"the load got only {len(outcomes)} answers"
        time.sleep(POLL_S)


def test_a_rolling_restart_under_load_loses_no_request(workdir: Path, model_cache_dir: Path) -> None:
    config = {"models": [{"name": EMBEDDED, "sampling_defaults": {"temperature": 0.0, "top_p": 1.0}}],
              "retrieval": {"data_dir": str(workdir / "rolling-collections")},
              "semantic_cache": {"enabled": False},
              "shutdown": {"drain_delay_s": 1.0, "grace_s": 60}}
    replicas = [GatewayProcess(f"rolling-{i}", config, workdir, model_cache_dir) for i in range(2)]
    for replica in replicas:
        replica.launch()
    for replica in replicas:
        replica.wait_ready()
    balancer = Balancer(replicas)
    outcomes: list[int | str] = []
    done = threading.Event()

    def load() -> None:
        n = 0
        while not done.is_set():
            body = {"model": EMBEDDED, "messages": [{"role": "user", "content": f"Say a word about {n}."}],
                    "max_tokens": 4}
            try:
                outcomes.append(balancer.post("/v1/chat/completions", body).status_code)
            except (httpx.HTTPError, AssertionError) as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            n += 1

    clients = [threading.Thread(target=load) for _ in range(2)]
    try:
        for client in clients:
            client.start()
        wait_for_answers(outcomes, 4)  # under load before the first replica goes
        for replica in replicas:  # one after the other, as a Deployment's rolling update does
            replica.stop()  # SIGTERM: draining, then the listener closes, in-flight requests finish
            assert replica.process.returncode is not None
            replica.launch().wait_ready()
            deadline = time.monotonic() + 10
            while replica.url not in balancer.ready:  # back in rotation before the next one goes
                assert time.monotonic() < deadline
                time.sleep(POLL_S)
        wait_for_answers(outcomes, len(outcomes) + 4)  # and answered after the last one is back
    finally:
        done.set()
        for client in clients:
            client.join(180)
        balancer.stopped.set()
        for replica in replicas:
            replica.stop()
    assert len(outcomes) > 10
    failures = [o for o in outcomes if o != 200]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
