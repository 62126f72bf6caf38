"""API keys: 401 without a valid key; each key belongs to a tenant."""

from __future__ import annotations

from typing import Iterator

import httpx
import openai
import pytest
from support import EMBEDDED, GatewayProcess, assert_openai_error


@pytest.fixture(scope="module")
def secured(upstream_launched: GatewayProcess, workdir, model_cache_dir) -> Iterator[GatewayProcess]:
    upstream = upstream_launched  # started side by side with this gateway, ready before the tests run
    config = {
        "models": [{"name": "routed", "backend": "litellm", "litellm_model": f"openai/{EMBEDDED}",
                    "api_base": f"{upstream.url}/v1"}],
        "api_keys": [{"key": "sk-team-a-0123456789", "tenant": "team-a"},
                     {"key_env": "TEAM_B_KEY", "tenant": "team-b"}],
    }
    process = GatewayProcess("secured", config, workdir, model_cache_dir,
                             env={"TEAM_B_KEY": "sk-team-b-9876543210"}).launch()
    process.wait_ready()
    upstream.wait_ready()
    yield process
    process.stop()


def test_requests_without_a_valid_key_get_401(secured: GatewayProcess) -> None:
    body = {"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = f"{secured.url}/v1/chat/completions"
    assert_openai_error(httpx.post(url, json=body), 401, "missing_api_key")
    assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer sk-wrong-key-000"}),
                        401, "invalid_api_key")
    assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Basic abc"}), 401, "invalid_api_key")
    assert_openai_error(httpx.get(f"{secured.url}/v1/models"), 401)
    # Health stays open for load balancers.
    assert httpx.get(f"{secured.url}/healthz").status_code == 200


@pytest.mark.parametrize("key", ["sk-team-a-0123456789", "sk-team-b-9876543210"])
def test_valid_keys_are_served(secured: GatewayProcess, key: str) -> None:
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(model="routed", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
    assert completion.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["routed"]


def test_wrong_key_through_the_openai_client(secured: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="sk-nobody-000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="routed", messages=[{"role": "user", "content": "hi"}])
