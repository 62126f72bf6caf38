"""Hit audits through a live gateway (semantic_cache.audit: semcache/audit.py, gateway/hit_audit.py): the embedded
model at temperature 0, a real Redis server, the openai client, every paraphrase hit audited (share 1).

A cached answer the model no longer gives (its entry rewritten in Redis, as a stale answer would be) is served,
then audited: the model's answer now is about something else, so the hit counts as a false hit and the entry is
gone. A cached answer the model still gives is kept.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from blendgate.semcache.entries import CacheEntry
from prometheus_client.parser import text_string_to_metric_families
from support import EMBEDDED, GatewayProcess, RedisServer, wait_until

KEY = "sk-audit-tenant-0123456789"
ADMIN_KEY = "admin-key-audit-0123456789"
MAX_TOKENS = 16
DIMENSION = 384  # all-MiniLM-L6-v2
STALE = "Bananas grow in tropical climates and are rich in potassium."


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"bgaudit:{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def gateway(module_redis: RedisServer, prefix: str, workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    config = {
        "models": [{"name": EMBEDDED, "backend": "local", "sampling_defaults": {"temperature": 0.0}}],
        "api_keys": [{"key": KEY, "tenant": "audited"}],
        "admin_key": ADMIN_KEY,
        "retrieval": {"data_dir": str(workdir / "audit-collections")},
        "semantic_cache": {"redis_url": module_redis.url, "key_prefix": prefix, "audit": {"share": 1.0}},
    }
    process = GatewayProcess("audit", config, workdir, model_cache_dir).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, question: str):
    raw = client.chat.completions.with_raw_response.create(
        model=EMBEDDED, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS)
    completion = raw.parse()
    return raw.headers["x-blendgate-cache"], completion, completion.model_extra["blendgate"]["semantic_cache"]


def entry_keys(redis: RedisServer, prefix: str) -> set[bytes]:
    with redis.client() as direct:
        return set(direct.scan_iter(f"{prefix}:*:entry:*"))


def audits(gateway: GatewayProcess) -> dict[str, float]:
    """blendgate_semantic_cache_audits_total by verdict, summed over categories."""
    text = httpx.get(f"{gateway.url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "blendgate_semantic_cache_audits":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    verdict = sample.labels["verdict"]
                    counts[verdict] = counts.get(verdict, 0.0) + sample.value
    return counts


def stored(client: openai.OpenAI, redis: RedisServer, prefix: str, question: str) -> bytes:
    """Ask a new question (a miss) and wait for its answer's entry."""
    before = entry_keys(redis, prefix)
    status, _, report = ask(client, question)
    assert status == "miss", report
    (key,) = wait_until(lambda: entry_keys(redis, prefix) - before, "the answer to be stored", 10)
    return key


def test_a_cached_answer_the_model_no_longer_gives_is_audited_away(gateway, client, module_redis, prefix) -> None:
    key = stored(client, module_redis, prefix, "What is the capital of France?")
    with module_redis.client() as direct:  # the answer goes stale: the entry now says something else
        entry = CacheEntry.from_fields(direct.hgetall(key), DIMENSION)
        entry.response = {**entry.response, "content": STALE}
        direct.hset(key, mapping=entry.to_fields())
    before = audits(gateway)
    status, hit, report = ask(client, "What's the capital of France?")
    assert status == "hit" and hit.choices[0].message.content == STALE  # served: the audit comes after
    assert report["audited"] is True and report["entry_id"] == key.decode().rsplit(":", 1)[1]
    wait_until(lambda: audits(gateway).get("disagree", 0) > before.get("disagree", 0), "the audit's verdict")
    wait_until(lambda: key not in entry_keys(module_redis, prefix), "the entry to be invalidated", 10)
    status, again, _ = ask(client, "What's the capital of France?")
    assert status == "miss" and again.choices[0].message.content != STALE
    # The admin API counts it beside the clients' reports (the admin UI shows "0 + 1" false hits).
    stats = httpx.get(f"{gateway.url}/admin/api/semantic-cache", timeout=30,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert stats["categories"][report["category"]]["audits"]["disagree"] >= 1


def test_a_cached_answer_the_model_still_gives_is_kept(gateway, client, module_redis, prefix) -> None:
    key = stored(client, module_redis, prefix, "What is the boiling point of water?")
    before = audits(gateway)
    status, _, report = ask(client, "What's the boiling point of water?")
    assert status == "hit" and report["audited"] is True
    wait_until(lambda: audits(gateway).get("agree", 0) > before.get("agree", 0), "the audit's verdict")
    assert audits(gateway).get("disagree", 0) == before.get("disagree", 0)
    assert key in entry_keys(module_redis, prefix)
    status, _, report = ask(client, "What is the boiling point of water?")  # the same question: not audited
    assert status == "hit" and "audited" not in report
