"""Valid-shaped chat bodies with odd values in every field, against live gateways with the embedded model (the
shared one, and one with the semantic cache on): never a 5xx, an error always in OpenAI's shape, a stream
never cut by an error.

Hypothesis draws text from every Unicode category (lone surrogates included, sent as JSON escapes), and for
every field mostly a value of its type, sometimes any JSON: integers at and past the 64-bit edges, floats from
NaN and infinities to subnormals, nested lists and objects.
Each body asks for at most 2 generated tokens (`max_completion_tokens`, which wins over `max_tokens`), or is
refused for that field, so the run stays short: a whole number written as a float counts as that integer, so
none above 2 is drawn (a stream asking for 1e308 tokens decodes to the end of the context window, minutes on CI's
CPU, and never trips the client's read timeout).
"""

from __future__ import annotations

import json
import math
from typing import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import EMBEDDED, GatewayProcess, assert_openai_error


def weighted(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int) -> st.SearchStrategy:
    """`common` `odds` times out of `odds + 1`, else `rare` (one_of would pick them about evenly)."""
    return st.integers(0, odds).flatmap(lambda draw: rare if draw == 0 else common)


INTEGERS = st.one_of(st.integers(-3, 300), st.sampled_from(
    [2 ** 31, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, -(2 ** 63), -(2 ** 63) - 1, 2 ** 64, 10 ** 30, -(10 ** 30)]))
FLOATS = st.one_of(st.floats(0.0, 2.0), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([-0.0, 5e-324, 1e308, -1e308]))
# Text of every category; now and then with lone surrogates (category Cs), or nearly every body would be
# refused for them alone.
TEXT = weighted(st.text(st.characters(), max_size=24),
                st.text(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=8), 20)
SCALARS = st.one_of(st.none(), st.booleans(), INTEGERS, FLOATS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)


def either(valid: st.SearchStrategy, odds: int = 40) -> st.SearchStrategy:
    """Mostly a well-typed value, sometimes any JSON."""
    return weighted(valid, JSON, odds)


def rarely(values: st.SearchStrategy) -> st.SearchStrategy:
    """Fields passed through to providers: mostly absent (null), sometimes any JSON."""
    return weighted(st.none(), values, 8)


def _not_a_large_count(value: float) -> bool:
    """False for a whole number above 2 written as a float (3.0, 1e308): the gateway takes it as the integer it
    is (JSON Schema's rule), so it would ask for up to the whole context window, minutes of decoding."""
    return not (math.isfinite(value) and value > 2 and value == int(value))


# Refused as max_completion_tokens, or (1.0, 2.0) within the cap (null is not: it would leave max_tokens to decide).
NOT_A_TOKEN_COUNT = st.one_of(st.integers(-(2 ** 64), 0), st.booleans(), FLOATS.filter(_not_a_large_count), TEXT,
                              st.lists(SCALARS, max_size=2))
PART = st.fixed_dictionaries({"type": either(st.sampled_from(["text", "text", "image_url", "input_audio"])),
                              "text": either(TEXT)}, optional={"image_url": JSON})
MESSAGE = st.fixed_dictionaries(
    {"role": either(weighted(st.sampled_from(["system", "developer", "user", "user", "assistant"]),
                             st.sampled_from(["tool", "function"]), 15)),
     "content": either(weighted(TEXT, st.lists(PART, max_size=3), 4))},
    optional={"name": either(TEXT), "tool_calls": rarely(JSON)})
DOCUMENT = TEXT | st.fixed_dictionaries({"text": either(TEXT)}, optional={"id": either(TEXT), "source": either(TEXT)})
BODY = st.fixed_dictionaries(
    {"model": either(st.just(EMBEDDED)),
     "messages": either(st.lists(MESSAGE, min_size=1, max_size=3)),
     # Caps every answer at 2 tokens, or is refused: it wins over max_tokens unless null, which it never is here.
     "max_completion_tokens": weighted(st.integers(1, 2), NOT_A_TOKEN_COUNT, 15)},
    optional={
        "max_tokens": either(INTEGERS), "temperature": either(st.floats(0.0, 2.0)),
        "top_p": either(st.floats(0.0, 1.0)),
        "stop": either(weighted(TEXT | st.lists(TEXT, max_size=4), st.lists(TEXT, min_size=5, max_size=6), 8)),
        "seed": either(INTEGERS), "n": either(st.just(1)),
        "stream": either(st.booleans()), "stream_options": either(st.fixed_dictionaries(
            {}, optional={"include_usage": either(st.booleans())})),
        "presence_penalty": either(st.floats(-2.0, 2.0)), "frequency_penalty": either(st.floats(-2.0, 2.0)),
        "user": either(TEXT),
        "logit_bias": rarely(JSON), "logprobs": rarely(JSON), "top_logprobs": rarely(JSON),
        "response_format": rarely(JSON), "metadata": rarely(JSON), "tools": rarely(JSON),
        "tool_choice": rarely(JSON), "reasoning_effort": rarely(JSON), "an_unknown_field": JSON,
        "documents": either(st.lists(DOCUMENT, max_size=3)),
        "rag": either(st.fixed_dictionaries({"collection": either(TEXT)}, optional={"top_k": either(INTEGERS)})),
        "blend": either(st.fixed_dictionaries({}, optional={
            "mode": either(st.sampled_from(["full_prefill", "prefix", "reuse", "blend"])),
            "recompute_ratio": either(st.floats(0.0, 1.0)), "fidelity_target": either(st.floats(0.01, 1.0))})),
        "cache": either(st.fixed_dictionaries({}, optional={
            "ttl": either(st.floats(1.0, 1e9)), "no-cache": either(st.booleans()), "no-store": either(st.booleans()),
            "s-maxage": either(st.floats(0.0, 1e9)), "namespace": either(TEXT)})),
    })


@pytest.fixture(scope="module")
def cached_http(cache_gateway: GatewayProcess) -> Iterator[httpx.Client]:
    """A gateway with the semantic cache on (the embedded entry store), whose fields then reach a layer."""
    with httpx.Client(base_url=cache_gateway.url, timeout=120) as session:
        yield session


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@FUZZ
@given(body=BODY)
def test_no_chat_body_gets_a_server_error(http: httpx.Client, body: dict) -> None:
    check_answer(http, body)


@FUZZ
@given(body=BODY)
def test_no_chat_body_gets_a_server_error_through_the_semantic_cache(cached_http: httpx.Client, body: dict) -> None:
    check_answer(cached_http, body)


def check_answer(http: httpx.Client, body: dict) -> None:
    """Not a 5xx; an error in OpenAI's shape; a whole answer, or a stream that ends with [DONE] and no error."""
    raw = json.dumps(body).encode()  # ASCII JSON: lone surrogates as \ud800 escapes, NaN and Infinity as Python writes
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = assert_openai_error(response, response.status_code)
        event(f"{response.status_code} {error['code']} {error['param']}")  # --hypothesis-show-statistics
        return
    event("200")
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        frames = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]", response.text
        assert not any("error" in json.loads(frame) for frame in frames[:-1]), response.text
    else:
        assert response.json()["object"] == "chat.completion"
