"""Helpers the tests import: live gateway processes on free loopback ports, and the OpenAI error check.

(Not in conftest.py: tests/gpu has a conftest of its own, and `import conftest` would find either.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

EMBEDDED = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayProcess:
    """`blendgate serve` in a subprocess, with its log kept for failure messages."""

    def __init__(self, name: str, config: dict, workdir: Path, cache_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "BLENDGATE_CACHE_DIR": str(cache_dir), **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> "GatewayProcess":
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "blendgate.gateway", "serve", "--config", str(self.config_path),
             "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=5).json()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error has OpenAI's shape and the expected status; returns the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error
