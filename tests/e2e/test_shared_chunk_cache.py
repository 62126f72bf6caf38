"""The shared chunk-cache tier between two real gateway processes (SmolLM2 on the CPU) and one real Redis: a
chunk blended by the first is a hit for the second without recompute; Redis killed while requests run loses
none of them, and the tier shows as down in /healthz, the admin API and /metrics."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import BLEND_ALWAYS, EMBEDDED, GatewayProcess, RedisServer, wait_until

ADMIN_KEY = "admin-key-for-shared-chunk-cache-tests"
DOCUMENTS = [{"id": "castle",
              "text": "The blue castle stands on a granite hill. The secret code of the blue castle is 4711."},
             {"id": "river", "text": "The Silverrun river flows north for 312 kilometres and freezes every January."}]
OTHER = [{"id": "bakery", "text": "The corner bakery on Elm Street sells rye bread only on Tuesdays."},
         {"id": "tower", "text": "The old clock tower in Harbour Square rings thirteen times at noon."}]
QUESTION = [{"role": "user", "content": "What is the secret code of the blue castle?"}]


@pytest.fixture(scope="module")
def redis(module_redis: RedisServer) -> RedisServer:
    """This module's own Redis (its last tests stop it)."""
    return module_redis


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:shared-kv:{uuid.uuid4().hex[:8]}"


def start_replica(name: str, redis: RedisServer, prefix: str, workdir: Path, model_cache_dir: Path) -> GatewayProcess:
    """One gateway replica, launched: its own local tiers (disk folder too), the shared tier in `redis`."""
    config = {
        "admin_key": ADMIN_KEY,
        "models": [{"name": EMBEDDED, "sampling_defaults": {"temperature": 0.0, "top_p": 1.0}}],
        "retrieval": {"data_dir": str(workdir / f"{name}-collections")},
        "chunk_cache": {**BLEND_ALWAYS, "disk_dir": str(workdir / f"{name}-chunk-kv"),
                        "redis": {"url": redis.url, "key_prefix": prefix, "timeout_s": 0.5, "retry_s": 0.3}},
        "semantic_cache": {"enabled": False},
    }
    return GatewayProcess(name, config, workdir, model_cache_dir).launch()


@pytest.fixture(scope="module")
def replicas(redis: RedisServer, prefix: str, workdir: Path, model_cache_dir: Path
             ) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    # Launched side by side, then waited for.
    first = start_replica("replica-a", redis, prefix, workdir, model_cache_dir)
    second = start_replica("replica-b", redis, prefix, workdir, model_cache_dir)
    try:
        first.wait_ready()
        second.wait_ready()
        yield first, second
    finally:
        first.stop()
        second.stop()


def ask(gateway: GatewayProcess, documents: list[dict], max_tokens: int = 8):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)
    return client.chat.completions.create(model=EMBEDDED, messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                          extra_body={"documents": documents})


def chunk_hits(answer) -> list[tuple[str, bool]]:
    return [(c["id"], c["hit"]) for c in answer.model_extra["blendgate"]["chunk_cache"]["chunks"]]


def shared_fetch(answer) -> list[str]:
    """Per chunk, where its KV came from (bandwidth adaptation's words: local, fetched, recomputed, not cached)."""
    return answer.model_extra["blendgate"]["chunk_cache"]["shared_fetch"]


def shared_tier(gateway: GatewayProcess) -> dict:
    """The shared tier's row of the admin API's chunk-cache view."""
    view = httpx.get(f"{gateway.url}/admin/api/chunk-cache", timeout=30,
                     headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    return next(t for t in view["models"][EMBEDDED]["tiers"] if t.get("shared"))


def test_a_chunk_blended_by_one_replica_is_a_hit_for_the_other(replicas, redis: RedisServer, prefix: str) -> None:
    first, second = replicas
    answer = ask(first, DOCUMENTS)
    assert chunk_hits(answer) == [("castle", False), ("river", False)]
    assert shared_fetch(answer) == ["not cached", "not cached"]
    # The system prompt's KV and both chunks, written behind the request.
    with redis.client() as direct:
        wait_until(lambda: direct.zcard(f"{prefix}:lru") >= 3, "three chunks in the shared tier", timeout_s=30)
    assert shared_tier(first)["writes"] >= 3
    answer = ask(second, DOCUMENTS[::-1], max_tokens=32)
    assert chunk_hits(answer) == [("river", True), ("castle", True)]  # from Redis: nothing recomputed
    assert shared_fetch(answer) == ["fetched", "fetched"]  # on loopback fetching beats recomputing
    # The KV came through Redis bit for bit: the first replica, blending from its own memory, says the same.
    local = ask(first, DOCUMENTS[::-1], max_tokens=32)
    assert chunk_hits(local) == [("river", True), ("castle", True)]
    assert shared_fetch(local) == ["local", "local"]
    assert answer.choices[0].message.content == local.choices[0].message.content
    tier = shared_tier(second)
    assert tier["name"] == "redis" and tier["up"] and tier["hits"] >= 3 and tier["writes"] == 0
    # Promoted into the second replica's own tiers: asked again, the chunks are local hits.
    health = httpx.get(f"{second.url}/healthz", timeout=10).json()["models"][EMBEDDED]["chunk_cache"]
    assert sum(t["entries"] for t in health["tiers"] if not t.get("shared")) >= 3


def test_redis_killed_while_requests_run_loses_none_and_shows_down(replicas, redis: RedisServer) -> None:
    first, second = replicas
    jobs = [(first, DOCUMENTS), (second, OTHER), (first, OTHER[:1]), (second, DOCUMENTS[:1] + OTHER[1:])]
    with ThreadPoolExecutor(len(jobs)) as pool:
        running = [pool.submit(ask, gateway, documents) for gateway, documents in jobs]
        time.sleep(0.3)
        redis.stop()
        answers = [job.result(timeout=180) for job in running]  # every request answered
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    # After the kill, both replicas still answer: new chunks are computed, known ones come from local tiers.
    answer = ask(second, [{"id": "mill", "text": "The windmill at Kettle Lane grinds barley every Friday."}])
    assert chunk_hits(answer) == [("mill", False)]
    assert chunk_hits(ask(second, DOCUMENTS)) == [("castle", True), ("river", True)]
    tier = shared_tier(second)
    assert tier["up"] is False and tier["down_reason"]
    text = httpx.get(f"{second.url}/metrics", timeout=10).text
    up = [s for family in text_string_to_metric_families(text) for s in family.samples
          if s.name == "blendgate_chunk_cache_tier_up"]
    assert [(s.labels["tier"], s.value) for s in up] == [("redis", 0.0)]
