"""/metrics and the admin JSON API on a live gateway: the series operators need, the admin figures read from the
same counters, entries browsed, searched and invalidated, secrets hidden, false-hit reports scoped by tenant."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import BLEND_ALWAYS, EMBEDDED, GatewayProcess, assert_openai_error

ADMIN_KEY = "admin-key-for-metrics-tests"
KEYS = {"acme": "sk-acme-metrics-test", "globex": "sk-globex-metrics-test"}
SECRET_API_BASE = "http://127.0.0.1:9/v1?api_key=S3CRET&api-version=1"


@pytest.fixture(scope="module")
def observed(workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    config = {
        "admin_key": ADMIN_KEY,
        "api_keys": [{"key": key, "tenant": tenant} for tenant, key in KEYS.items()],
        "models": [{"name": EMBEDDED, "sampling_defaults": {"temperature": 0.0, "top_p": 1.0}},
                   # Never reachable: its api_base carries secrets in the userinfo and the query string.
                   {"name": "secret-upstream", "backend": "litellm", "litellm_model": "openai/x",
                    "api_base": SECRET_API_BASE, "timeout_s": 10},
                   {"name": "secret-userinfo", "backend": "litellm", "litellm_model": "openai/x",
                    "api_base": "http://bob:p@ss-S3CRET@127.0.0.1:9/v1"}],
        "retrieval": {"data_dir": str(workdir / "metrics-collections")},
        "chunk_cache": BLEND_ALWAYS,
        "semantic_cache": {"enabled": True},  # the embedded entry store: no Redis configured
    }
    process = GatewayProcess("metrics", config, workdir, model_cache_dir).start()
    yield process
    process.stop()


def client(gateway: GatewayProcess, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)


def admin(gateway: GatewayProcess, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{gateway.url}/admin/api{path}", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)


def scrape(gateway: GatewayProcess) -> dict[str, list]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def ask(gateway: GatewayProcess, tenant: str, question: str, **extra):
    return client(gateway, tenant).chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": question}], max_tokens=12, **extra)


def test_metrics_cover_requests_latency_caches_and_queues(observed: GatewayProcess) -> None:
    first = ask(observed, "acme", "What is the capital of France?")
    hit = ask(observed, "acme", "What is the capital of France?")
    assert hit.model_extra["blendgate"]["semantic_cache"]["status"] == "hit"
    ask(observed, "acme", "Which river is the longest?", extra_body={"documents": ["The Nile is 6650 km long."]})
    httpx.post(f"{observed.url}/v1/chat/completions", json={"model": "nope", "messages": []},
               headers={"Authorization": f"Bearer {KEYS['acme']}"}, timeout=10)
    families = scrape(observed)
    requests = families["blendgate_requests"]
    assert total(requests, "blendgate_requests_total", model=EMBEDDED, status="200", route="chat") >= 3
    assert total(requests, "blendgate_requests_total", status="400", route="chat") + \
        total(requests, "blendgate_requests_total", status="404", route="chat") >= 1
    ttft = families["blendgate_time_to_first_token_seconds"]
    assert total(ttft, "blendgate_time_to_first_token_seconds_count", model=EMBEDDED, cache="hit") >= 1
    assert total(ttft, "blendgate_time_to_first_token_seconds_count", model=EMBEDDED, cache="miss") >= 2
    assert total(families["blendgate_chunk_cache_lookups"], "blendgate_chunk_cache_lookups_total",
                 result="miss") >= 1
    assert total(families["blendgate_blend_recompute_ratio"], "blendgate_blend_recompute_ratio_count") >= 1
    tiers = {s.labels["tier"] for s in families["blendgate_chunk_cache_tier_bytes"]}
    assert {"cpu", "disk"} <= tiers
    assert "blendgate_backend_queue_depth" in families and "blendgate_request_duration_seconds" in families
    lookups = families["blendgate_semantic_cache_lookups"]
    assert total(lookups, "blendgate_semantic_cache_lookups_total", result="hit") >= 1
    assert first.choices[0].message.content == hit.choices[0].message.content


def test_admin_figures_are_the_metrics_counters(observed: GatewayProcess) -> None:
    ask(observed, "globex", "Name a large ocean.")
    stats = admin(observed, "GET", "/stats").json()
    families = scrape(observed)  # after the stats: counters only grow, and no request ran between
    requests = families["blendgate_requests"]
    chat_total = total(requests, "blendgate_requests_total", route="chat")
    assert stats["requests"]["by_route"]["chat"] == chat_total
    semantic = stats["layers"]["semantic_cache"]
    lookups = families["blendgate_semantic_cache_lookups"]
    assert semantic["hits"] == total(lookups, "blendgate_semantic_cache_lookups_total", result="hit")
    assert semantic["lookups"] == total(lookups, "blendgate_semantic_cache_lookups_total")
    chunk = stats["layers"]["chunk_cache"]
    assert chunk["lookups"] == total(families["blendgate_chunk_cache_lookups"], "blendgate_chunk_cache_lookups_total")
    assert stats["ttft_ms"]["cache_hit"]["count"] == total(
        families["blendgate_time_to_first_token_seconds"], "blendgate_time_to_first_token_seconds_count", cache="hit")
    assert stats["saved"]["tokens"] >= 1 and stats["redis"] is None  # the embedded entry store
    semantic_cache = admin(observed, "GET", "/semantic-cache").json()
    categories = semantic_cache["categories"]
    assert sum(c["hits"] for c in categories.values()) == semantic["hits"]
    # The false-hit bound per category, in the admin stats and as gauges, the same figures.
    bounds = {c["category"]: c for c in semantic_cache["verifier"]["categories"]}
    assert {s.labels["category"] for s in families["blendgate_semantic_cache_false_hit_bound"]} == set(bounds)
    for sample in families["blendgate_semantic_cache_false_hit_bound"]:
        assert bounds[sample.labels["category"]]["bound"] == sample.value == 0.02
    for sample in families["blendgate_semantic_cache_false_hit_estimate"]:
        assert bounds[sample.labels["category"]]["estimate"] == pytest.approx(sample.value, abs=1e-4)


def test_entries_are_browsed_searched_and_invalidated(observed: GatewayProcess) -> None:
    ask(observed, "acme", "How many legs does a spider have?")
    listed = admin(observed, "GET", "/semantic-cache/entries", params={"search": "SPIDER"}).json()
    assert listed["total"] == 1
    entry = listed["data"][0]
    assert entry["tenant"] == "acme" and entry["model"] == EMBEDDED and "spider" in entry["query"]
    assert admin(observed, "GET", "/semantic-cache/entries", params={"tenant": "globex", "search": "spider"}
                 ).json()["total"] == 0
    page = admin(observed, "GET", "/semantic-cache/entries", params={"limit": 1}).json()
    assert len(page["data"]) == 1 and page["total"] >= 2
    assert admin(observed, "DELETE", f"/semantic-cache/entries/{entry['id']}").json() == {"invalidated": 1}
    assert_openai_error(admin(observed, "DELETE", f"/semantic-cache/entries/{entry['id']}"), 404, "entry_not_found")
    again = ask(observed, "acme", "How many legs does a spider have?")
    assert again.model_extra["blendgate"]["semantic_cache"]["status"] == "miss"
    assert_openai_error(admin(observed, "GET", "/semantic-cache/entries", params={"limit": 1000}), 400)


def test_false_hit_reports_are_counted_and_scoped_to_their_tenant(observed: GatewayProcess) -> None:
    ask(observed, "acme", "What colour is the sky on a clear day?")
    hit = ask(observed, "acme", "What colour is the sky on a clear day?")
    report = hit.model_extra["blendgate"]["semantic_cache"]
    assert report["status"] == "hit"
    url = f"{observed.url}/v1/semantic-cache/false-hit"
    foreign = httpx.post(url, json={"entry_id": report["entry_id"]}, timeout=10,
                         headers={"Authorization": f"Bearer {KEYS['globex']}"})
    assert_openai_error(foreign, 404, "entry_not_found")  # another tenant learns nothing about it
    own = httpx.post(url, json={"entry_id": report["entry_id"]}, timeout=10,
                     headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert own.json() == {"reported": True, "invalidated": 1}
    families = scrape(observed)
    assert total(families["blendgate_semantic_cache_false_hit_reports"],
                 "blendgate_semantic_cache_false_hit_reports_total", category=report["category"]) == 1
    assert_openai_error(httpx.post(url, json={"id": "x"}, timeout=10,
                                   headers={"Authorization": f"Bearer {KEYS['acme']}"}), 400)


def test_admin_api_needs_its_key_and_hides_secrets(observed: GatewayProcess) -> None:
    for key in (None, KEYS["acme"], "wrong-admin-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{observed.url}/admin/api/stats", headers=headers, timeout=10)
        assert_openai_error(response, 401, "invalid_admin_key")
    config = admin(observed, "GET", "/config").json()
    assert config["admin_key"] == "***" and all(k["key"] == "***" for k in config["api_keys"])
    assert ADMIN_KEY not in httpx.get(f"{observed.url}/admin/api/config", timeout=10,
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    chunk = admin(observed, "GET", "/chunk-cache").json()["models"][EMBEDDED]
    assert {t["name"] for t in chunk["tiers"]} >= {"cpu", "disk"}
    # The blend-or-full-prefill costs it decides with: configured here (support.BLEND_ALWAYS).
    assert chunk["prefill_costs"] == {"pass_tokens": 0, "placement_tokens": 0, "pass_cost": "configured"}
    # The Nile document of the first test was sent inline: its chunk is held, and named.
    assert chunk["collections"]["(inline)"]["chunks"] >= 1
    assert any(c["source"] == "request#0" and c["tier"] in ("cpu", "disk") for c in chunk["top_chunks"])


def test_upstream_secrets_are_hidden_from_the_config_view_and_errors(observed: GatewayProcess) -> None:
    config = admin(observed, "GET", "/config")
    assert config.status_code == 200 and "S3CRET" not in config.text
    api_bases = {m["name"]: m.get("api_base") for m in config.json()["models"]}
    assert api_bases["secret-upstream"] == "http://127.0.0.1:9/v1?api_key=***&api-version=1"
    assert api_bases["secret-userinfo"] == "http://bob:***@127.0.0.1:9/v1"
    failed = httpx.post(f"{observed.url}/v1/chat/completions", timeout=30,
                        headers={"Authorization": f"Bearer {KEYS['acme']}"},
                        json={"model": "secret-upstream", "messages": [{"role": "user", "content": "hi"}]})
    error = assert_openai_error(failed, 502, "upstream_unreachable")
    assert "S3CRET" not in failed.text and "127.0.0.1:9" in error["message"]


def test_open_metrics_name_no_tenant_by_default(observed: GatewayProcess) -> None:
    ask(observed, "globex", "What is the tallest mountain on Earth?")
    text = httpx.get(f"{observed.url}/metrics", timeout=10).text
    assert "acme" not in text and "globex" not in text
    families = scrape(observed)
    assert total(families["blendgate_semantic_cache_lookups"], "blendgate_semantic_cache_lookups_total") >= 1
    assert all("tenant" not in sample.labels for samples in families.values() for sample in samples)
