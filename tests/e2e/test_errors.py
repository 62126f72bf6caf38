"""Bad input gets OpenAI's error shape and a fitting status, never a 500."""

from __future__ import annotations

import json

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
        # Strict types, as OpenAI's: no string for a number or a boolean, no null for a message's text.
        ({"model": EMBEDDED, "messages": HI, "max_tokens": "10"}, 400, "invalid_value", "max_tokens"),
        ({"model": EMBEDDED, "messages": HI, "stream": "yes"}, 400, "invalid_value", "stream"),
        ({"model": EMBEDDED, "messages": HI, "temperature": "0.5"}, 400, "invalid_value", "temperature"),
        ({"model": EMBEDDED, "messages": HI, "rag": {"collection": "docs", "top_k": "3"}}, 400, "invalid_value",
         "rag.top_k"),
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": None}]}, 400, "invalid_value",
         "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "system", "content": None}, *HI]}, 400, "invalid_value",
         "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "user"}]}, 400, "invalid_value", "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value",
         "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "invalid_value",
         "messages[0].content[0]"),
        # OpenAI's seed is a signed 64-bit integer.
        ({"model": EMBEDDED, "messages": HI, "seed": 2 ** 64}, 400, "invalid_value", "seed"),
        ({"model": EMBEDDED, "messages": HI, "seed": -(2 ** 63) - 1}, 400, "invalid_value", "seed"),
    ],
)
def test_bad_request_bodies(http: httpx.Client, body: dict, status: int, code: str, param: str) -> None:
    for stream in (False, True):
        error = assert_openai_error(http.post("/v1/chat/completions", json={**body, "stream": stream}
                                              if "stream" not in body else body), status, code)
        assert error["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": "x \ud800"}]}, "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "system", "content": "be \udfff terse"}, *HI]},
         "messages[0].content"),
        ({"model": EMBEDDED, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
         "messages[0].content[0].text"),
        ({"model": EMBEDDED, "messages": HI, "documents": ["a \ud800 b"]}, "documents[0]"),
        ({"model": EMBEDDED, "messages": HI, "documents": [{"text": "\udc00", "id": "d"}]}, "documents[0].text"),
        ({"model": EMBEDDED, "messages": HI, "user": "\ud800"}, "user"),
        ({"model": EMBEDDED, "messages": HI, "metadata": {"k\ud800": "v"}}, "metadata"),
    ],
)
def test_text_that_is_not_valid_unicode_is_400(http: httpx.Client, body: dict, param: str) -> None:
    """JSON can spell a lone surrogate; no tokenizer or encoder takes one. Refused where it arrives."""
    for stream in (False, True):
        raw = json.dumps({**body, "stream": stream}).encode()  # ASCII JSON with the \ud800 escapes as sent
        error = assert_openai_error(http.post("/v1/chat/completions", content=raw,
                                              headers={"content-type": "application/json"}), 400, "invalid_value")
        assert error["param"] == param
        assert "lone surrogate" in error["message"]


def test_text_that_looks_like_the_templates_internals_is_just_text(http: httpx.Client) -> None:
    """Whatever a message holds (here the NUL-delimited marker the RAG template once searched for), the RAG
    prompt places the documents where the last message goes."""
    odd = "\x00blendgate-rag-segments\x00"
    for messages in ([{"role": "system", "content": f"Be terse. {odd}"}, {"role": "user", "content": "Who?"}],
                     [{"role": "user", "content": odd}, {"role": "assistant", "content": odd},
                      {"role": "user", "content": f"Who {odd}?"}]):
        body = {"model": EMBEDDED, "messages": messages, "documents": ["Ada wrote the first program."],
                "max_tokens": 3}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["blendgate"]["rag"]["chunks"][0]["source"] == "request#0"


@pytest.mark.parametrize("raw", [b'{"model": "x", ', b"not json at all", b"", b"[1, 2]", b'"a string"'])
def test_malformed_json(http: httpx.Client, raw: bytes) -> None:
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_another_content_type_is_told_which(http: httpx.Client, content_type: str) -> None:
    body = b'{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert_openai_error(response, 400, "invalid_json")
    message = response.json()["error"]["message"]
    assert "Content-Type: application/json" in message and content_type in message, message


def test_a_body_without_a_content_type_is_not_told_about_one(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b"[1, 2]")  # no Content-Type header at all
    assert_openai_error(response, 400, "invalid_json")
    assert "Content-Type" not in response.json()["error"]["message"], response.text


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


def test_inline_documents_are_bounded_in_count_and_tokens(http: httpx.Client) -> None:
    """retrieval.max_inline_documents (100) and max_inline_document_tokens (32,768) by default: each limit
    is named in the refusal, before any document is placed or blended."""
    body = {"model": EMBEDDED, "messages": HI, "max_tokens": 1}
    many = assert_openai_error(http.post("/v1/chat/completions", json={**body, "documents": ["x"] * 101}), 400,
                               "too_many_documents")
    assert many["param"] == "documents"
    assert "101 inline documents" in many["message"] and "100" in many["message"]
    assert "retrieval.max_inline_documents" in many["message"]
    long_documents = [" ".join(["word"] * 20_000)] * 2
    long = assert_openai_error(http.post("/v1/chat/completions", json={**body, "documents": long_documents}),
                               413, "documents_too_long")
    assert "40000 tokens" in long["message"] and "32768" in long["message"]
    assert long["param"] == "documents"
    assert http.post("/v1/chat/completions", json={**body, "documents": ["x"] * 100}).status_code == 200


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
