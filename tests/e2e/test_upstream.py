"""The litellm route, end to end: gateway -> litellm -> a second blendgate process on loopback."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import EMBEDDED, assert_openai_error

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_litellm_route_answers_like_the_upstream(client: openai.OpenAI, upstream) -> None:
    direct = openai.OpenAI(base_url=f"{upstream.url}/v1", api_key="x", max_retries=0)
    expected = direct.chat.completions.create(model=EMBEDDED, messages=QUESTION, max_tokens=20, temperature=0)
    routed = client.chat.completions.create(model="upstream-smol", messages=QUESTION, max_tokens=20, temperature=0)
    assert routed.model == "upstream-smol"
    assert routed.choices[0].message.content == expected.choices[0].message.content
    assert "Paris" in routed.choices[0].message.content
    assert routed.usage.prompt_tokens == expected.usage.prompt_tokens
    assert routed.model_extra["blendgate"]["backend"] == "litellm"


def test_litellm_route_streams(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="upstream-smol", messages=QUESTION, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1, "arrived in one piece"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].model_extra["blendgate"]["backend"] == "litellm"


def test_upstream_errors_keep_their_meaning(http: httpx.Client) -> None:
    # The upstream refuses an oversized prompt with 413; the gateway passes the meaning on.
    long = {"model": "upstream-smol", "messages": [{"role": "user", "content": "word " * 9000}]}
    response = http.post("/v1/chat/completions", json=long)
    assert response.status_code in (400, 413)
    assert_openai_error(response, response.status_code)


@pytest.mark.parametrize("stream", [False, True])
def test_unreachable_upstream_is_502(http: httpx.Client, stream: bool) -> None:
    response = http.post("/v1/chat/completions",
                         json={"model": "dead-upstream", "messages": QUESTION, "stream": stream})
    error = assert_openai_error(response, 502, "upstream_unreachable")
    assert "unreachable" in error["message"]
