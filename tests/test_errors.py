"""Bad input gets OpenAI's error shape and a fitting status, never a 500."""

from __future__ import annotations

import httpx
import openai
import pytest
from support import EMBEDDED, assert_openai_error

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        ({"messages": HI}, 400, "missing_required_parameter", "model"),
        ({"model": EMBEDDED}, 400, "missing_required_parameter", "messages"),
        ({"model": EMBEDDED, "messages": []}, 400, "invalid_value", "messages"),
        ({"model": EMBEDDED, "messages": "hi"}, 400, "invalid_value", "messages"),
        ({"model": EMBEDDED, "messages": HI, "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ({"model": EMBEDDED, "messages": HI, "temperature": 3}, 400, "invalid_value", "temperature"),
        ({"model": EMBEDDED, "messages": HI, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
        ({"model": EMBEDDED, "messages": HI, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
        ({"model": EMBEDDED, "messages": HI, "n": 2}, 400, "invalid_value", "n"),
        ({"model": EMBEDDED, "messages": HI, "stream": "yes please"}, 400, "invalid_value", "stream"),
        ({"model": EMBEDDED, "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
        ({"model": EMBEDDED, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value",
         "messages[0].role"),
        ({"model": EMBEDDED, "messages": [{"content": "hi"}]}, 400, "missing_required_parameter", "messages[0].role"),
        ({"model": EMBEDDED, "messages": [{"role": "tool", "content": "42"}]}, 400, "unsupported_value",
         "messages[0].role"),
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         400, "unsupported_value", "messages[0].content"),
        ({"model": EMBEDDED, "messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]},
         400, "unsupported_parameter", "tools"),
        ({"model": "no-such-model", "messages": HI}, 404, "model_not_found", "model"),
        # blendgate's own fields are validated even before their layers serve them.
        ({"model": EMBEDDED, "messages": HI, "rag": {"top_k": 3}}, 400, "missing_required_parameter",
         "rag.collection"),
        ({"model": EMBEDDED, "messages": HI, "rag": {"collection": "docs", "top_k": 0}}, 400, "invalid_value",
         "rag.top_k"),
        ({"model": EMBEDDED, "messages": HI, "blend": {"recompute_ratio": 1.5}}, 400, "invalid_value",
         "blend.recompute_ratio"),
        ({"model": EMBEDDED, "messages": HI, "cache": {"no-cache": "maybe"}}, 400, "invalid_value",
         "cache.no-cache"),
        ({"model": EMBEDDED, "messages": HI, "cache": {"ttl": -1}}, 400, "invalid_value", "cache.ttl"),
        ({"model": EMBEDDED, "messages": HI, "rag": {"collection": "no-such-collection"}}, 404,
         "collection_not_found", None),
        ({"model": EMBEDDED, "messages": HI, "rag": {"collection": "docs", "top_k": 500}}, 400, "invalid_value",
         "rag.top_k"),
        ({"model": EMBEDDED, "messages": [{"role": "assistant", "content": "hi"}], "documents": ["x"]}, 400,
         "invalid_value", "messages"),
    ],
)
def test_bad_request_bodies(http: httpx.Client, body: dict, status: int, code: str, param: str) -> None:
    for stream in (False, True):
        error = assert_openai_error(http.post("/v1/chat/completions", json={**body, "stream": stream}
                                              if "stream" not in body else body), status, code)
        assert error["param"] == param


@pytest.mark.parametrize("raw", [b'{"model": "x", ', b"not json at all", b"", b"[1, 2]", b'"a string"'])
def test_malformed_json(http: httpx.Client, raw: bytes) -> None:
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")


def test_unknown_extra_fields_are_ignored(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=EMBEDDED, messages=HI, max_tokens=2,
                                                extra_body={"frobnicate": {"level": 11}, "blend": {"mode": "blend"}})
    assert completion.choices[0].message.content


def test_prompt_longer_than_context_is_413(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "word " * 9000}]  # SmolLM2's context is 8192 tokens
    error = assert_openai_error(http.post("/v1/chat/completions", json={"model": EMBEDDED, "messages": messages}),
                                413, "context_length_exceeded")
    assert "8192" in error["message"]
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=EMBEDDED, messages=messages, stream=True)
    assert raised.value.status_code == 413


def test_documents_longer_than_the_context_are_413(http: httpx.Client) -> None:
    body = {"model": EMBEDDED, "messages": HI, "documents": [{"id": "huge", "text": "word " * 9000}]}
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 413, "context_length_exceeded")
    assert "8192" in error["message"]


def test_oversized_body_is_413(http: httpx.Client) -> None:
    body = b'{"model": "' + b"x" * 1_200_000 + b'"}'  # the test gateway's limit is 1,000,000 bytes
    assert_openai_error(http.post("/v1/chat/completions", content=body,
                                  headers={"content-type": "application/json"}), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit applies while the body arrives
        for _ in range(12):
            yield b" " * 100_000

    assert_openai_error(http.post("/v1/chat/completions", content=chunks(),
                                  headers={"content-type": "application/json"}), 413, "request_too_large")


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    assert_openai_error(http.get("/v1/models/no-such-model"), 404, "model_not_found")


def test_openai_client_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nothing", messages=HI)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBEDDED, messages=HI, n=3)
