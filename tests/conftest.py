"""Live gateway processes for the tests: real servers on free loopback ports, talked to over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
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


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the GGUF -> safetensors conversion lands; BLENDGATE_TEST_CACHE_DIR keeps it across runs."""
    kept = os.environ.get("BLENDGATE_TEST_CACHE_DIR")
    return Path(kept) if kept else tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateways")


@pytest.fixture(scope="session")
def upstream(workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    """A plain blendgate with the embedded model: the 'remote provider' for litellm routes."""
    process = GatewayProcess("upstream", {"retrieval": {"data_dir": str(workdir / "upstream-collections")}},
                             workdir, model_cache_dir).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gateway(upstream: GatewayProcess, workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    """The gateway under test: the embedded local model plus litellm routes to a live and a dead upstream."""
    config = {
        "models": [
            {"name": EMBEDDED, "backend": "local", "sampling_defaults": {"temperature": 0.2, "top_p": 0.9}},
            {"name": "upstream-smol", "backend": "litellm", "litellm_model": f"openai/{EMBEDDED}",
             "api_base": f"{upstream.url}/v1"},
            {"name": "dead-upstream", "backend": "litellm", "litellm_model": f"openai/{EMBEDDED}",
             "api_base": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 10},
            # RAG-enabled: every request retrieves from the "facts" collection.
            {"name": "facts-rag", "backend": "litellm", "litellm_model": f"openai/{EMBEDDED}",
             "api_base": f"{upstream.url}/v1", "rag": {"collection": "facts", "top_k": 2}},
        ],
        "max_request_bytes": 1_000_000,
        "retrieval": {"data_dir": str(workdir / "gateway-collections")},
    }
    process = GatewayProcess("gateway", config, workdir, model_cache_dir).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=120) as session:
        yield session


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


@pytest.fixture(scope="session")
def loaded_model(model_cache_dir: Path):
    """The embedded model loaded in the test process (converted once per cache directory)."""
    from blendgate.engine.weights import load_model

    return load_model(None, dtype="float32", device="cpu", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    return loaded_model.tokenizer
