"""Helpers the tests import: live gateway processes and Redis servers on free loopback ports, and the OpenAI
error check.

(Not in conftest.py: tests/gpu has a conftest of its own, and `import conftest` would find either.)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gateway_launcher
import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent  # the checkout: README.md, deploy/, docs/
EMBEDDED = "smollm2-135m-instruct"
# chunk_cache settings for gateways whose tests blend documents of a few tokens, which blending does not pay
# for (chunkcache/fallback.py would prefill them in full): no per-chunk cost, so they are blended anyway and
# the tests exercise blending. The fallback has tests of its own (unit/chunkcache/test_chunkcache_runner.py).
BLEND_ALWAYS = {"pass_cost_tokens": 0, "placement_cost_tokens": 0}


def wait_until(condition, what: str, timeout_s: float = 120.0, poll_s: float = 0.1):
    """The first truthy value of `condition()`, asked every `poll_s`; AssertionError naming `what` after
    `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} ({timeout_s:g} s)")
        time.sleep(poll_s)


def free_port(highest: int | None = None) -> int:
    """A loopback port free now: any the OS picks, or one at most `highest` (tried at random from 20000 up)."""
    for _ in range(200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 0 if highest is None else random.randint(20000, highest)))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError(f"no free loopback port at most {highest}")


# SGLang opens more ports above its HTTP port (its gRPC port is the HTTP port + 10000), so an SGLang server's
# port must leave room for them: an ephemeral port (up to 60999) failed its start with "SGLANG_GRPC_PORT (69721)".
SGLANG_HIGHEST_PORT = 55000


class GatewayProcess:
    """`blendgate serve` in a process of its own (forked, see gateway_launcher.py, or a subprocess), with its log
    kept for failure messages."""

    def __init__(self, name: str, config: dict, workdir: Path, cache_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "BLENDGATE_CACHE_DIR": str(cache_dir), **(env or {})}
        self.process: subprocess.Popen | gateway_launcher.ForkedProcess | None = None

    def start(self, timeout_s: float = 240.0, ready_models: list[str] | None = None) -> "GatewayProcess":
        """Start, and wait until /healthz says ready (or, with `ready_models`, until those models are ready:
        a configuration with a model that can never be ready, e.g. a dead worker, is never "ready" overall)."""
        return self.launch().wait_ready(timeout_s, ready_models)

    def wait_ready(self, timeout_s: float = 240.0, ready_models: list[str] | None = None) -> "GatewayProcess":
        """Wait for a launched process as `start` does (several processes launched first start side by side)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=2)
                if ready_models is None and health.status_code == 200:
                    return self
                if ready_models is not None and all(health.json()["models"][name]["state"] == "ready"
                                                    for name in ready_models):
                    return self
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s} s:\n{self.log()}")

    def launch(self) -> "GatewayProcess":
        """Start the process without waiting for anything."""
        argv = ["serve", "--config", str(self.config_path), "--port", str(self.port)]
        if gateway_launcher.enabled():  # a start of seconds, not ~20 s of imports on 2 cores
            self.process = gateway_launcher.ForkedProcess(argv, self.env, self.log_path)
            return self
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*gateway_launcher.ENTRY_POINT, *argv],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

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


class RedisServer:
    """A throwaway `redis-server` on a free loopback port, with no persistence; it can be stopped and started
    again on the same port (an empty server then, as after a crash of a cache-only Redis)."""

    def __init__(self, executable: str = "redis-server") -> None:
        self.executable = executable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="blendgate-redis-"))
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 20.0) -> "RedisServer":
        if self.running:
            return self
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", str(self.dir), "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} after {timeout_s} s:\n{self.log()}")

    def ping(self) -> bool:
        """True when the server answers PING (a bare RESP exchange: no client library needed)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server outright (SIGKILL: the cache must cope with a Redis that vanishes)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _find_or_apt_install(executable: str, package: str) -> str | None:
    """An executable from a Debian package; the package is installed with apt-get (quietly) when the
    executable is missing and we are root."""
    found = shutil.which(executable) or next(
        (p for p in (f"/usr/bin/{executable}", f"/usr/local/bin/{executable}") if os.access(p, os.X_OK)), None)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                    ["sh", "-c", f"apt-get update -qq && apt-get install -y -qq --no-install-recommends {package}"]):
        try:
            subprocess.run(command, env=env, capture_output=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        found = shutil.which(executable)
        if found:
            return found
    return None


def find_redis_server() -> str | None:
    """The redis-server executable (Debian's redis-server package, installed when missing and we can)."""
    return _find_or_apt_install("redis-server", "redis-server")


def find_chromium() -> str | None:
    """Debian's chromium, for the admin UI's browser test (installed when missing and we can)."""
    return _find_or_apt_install("chromium", "chromium")


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


class _WorkerProcess:
    """An SGLang-API worker in a subprocess on a free loopback port, ready once its /health answers 200; its
    output kept in a log for failure messages. Subclasses say how it is launched (`_command`, `_env`)."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.port = free_port(SGLANG_HIGHEST_PORT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None  # the test process's own

    def start(self, timeout_s: float = 240.0):
        return self.launch().wait_ready(timeout_s)

    def launch(self):
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, env=self._env())
        return self

    def wait_ready(self, timeout_s: float = 240.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout_s} s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait(timeout=15)


class SglangStandin(_WorkerProcess):
    """tests/sglang_standin.py (a worker speaking SGLang's HTTP API, backed by the local engine) in a
    subprocess on a free port."""

    def __init__(self, name: str, workdir: Path, cache_dir: Path) -> None:
        super().__init__(name, workdir)
        self.cache_dir = cache_dir

    def _command(self) -> list[str]:
        script = Path(__file__).with_name("sglang_standin.py")
        return [sys.executable, str(script), "--port", str(self.port), "--cache-dir", str(self.cache_dir)]

    def fault(self, **faults) -> None:
        httpx.post(f"{self.url}/standin/fault", json=faults, timeout=5).raise_for_status()


class SglangServer(_WorkerProcess):
    """A real SGLang HTTP server (`python -m sglang.launch_server`, bf16, the radix cache and CUDA graphs on, as
    deployed) with blendgate's plugin, serving `model_dir` with its tokenizer (events carry text). GPU machine
    only (tests/gpu/; bench/device/sglang_bundle.sh brings SGLang there). `plugin_env`: BLENDGATE_SGLANG_*
    settings (sglang_plugin/settings.py) on top of the test process's environment."""

    def __init__(self, name: str, workdir: Path, model_dir: Path, plugin_env: dict[str, str] | None = None,
                 mem_fraction_static: float = 0.3) -> None:
        super().__init__(name, workdir)
        self.model_dir = model_dir
        self.plugin_env = {"BLENDGATE_SGLANG_PLUGIN": "1", **(plugin_env or {})}
        self.mem_fraction_static = mem_fraction_static

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model_dir),
                "--dtype", "bfloat16", "--random-seed", "0", "--mem-fraction-static", str(self.mem_fraction_static),
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                # No structured outputs here; without the flag SGLang's scheduler imports xgrammar at start, which
                # the device bundle does not carry (the H200 run failed on it).
                "--grammar-backend", "none"]

    def _env(self) -> dict[str, str]:
        # PYTHONSAFEPATH: `python -m` from the checkout would let kernels/ shadow transformers' `kernels`
        # (gateway/syspath.py).
        return {**os.environ, "PYTHONSAFEPATH": "1", **self.plugin_env}

    def stop(self) -> None:
        """SIGTERM first: SGLang's launcher then stops its scheduler and detokenizer processes with it."""
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def tiny_llama(layers: int = 3, heads: int = 8, kv_heads: int = 2, seed: int = 5, max_positions: int = 1024):
    """A random-weight Llama on the CPU in float32 (vocabulary 200, hidden 64, MLP 128) for the blending and codec
    unit tests: LlamaFamilyModel.random's weights, larger than an initialiser's, make attention sharp enough that
    context visibly changes the KV."""
    import torch
    from blendgate.engine.llama import LlamaFamilyModel
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=200, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=max_positions)
    return LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32, seed=seed)
