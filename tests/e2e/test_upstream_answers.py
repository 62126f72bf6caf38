"""The litellm route against a stand-in provider (tests/openai_standin.py) that answers what each test scripts:
what the semantic-cache key covers, answers the gateway cannot interpret, and fields passed on as they came.

The gateway runs with the semantic cache on (the in-process store); each test asks in a cache namespace of its
own, so no test is answered from another's entries.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from blendgate.gateway.schemas import OPENAI_CHAT_PARAMS
from openai_standin import OpenAIStandin, chunk, completion, stream_of
from support import GatewayProcess, assert_openai_error

MODEL = "standin"
QUESTION = "What is the capital of France?"
LOGPROBS = {"content": [{"token": "Paris", "logprob": -0.25, "bytes": [80, 97, 114, 105, 115],
                         "top_logprobs": [{"token": "Paris", "logprob": -0.25, "bytes": [80, 97, 114, 105, 115]}]}]}


@pytest.fixture(scope="module")
def standin() -> Iterator[OpenAIStandin]:
    server = OpenAIStandin().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(standin: OpenAIStandin, workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    config = {"models": [{"name": MODEL, "backend": "litellm", "litellm_model": "openai/standin-model",
                          "api_base": standin.url, "timeout_s": 20}],
              "retrieval": {"data_dir": str(workdir / "standin-collections")}}
    process = GatewayProcess("standin-gateway", config, workdir, model_cache_dir).start()
    yield process
    process.stop()


@pytest.fixture
def http(gateway: GatewayProcess, standin: OpenAIStandin) -> Iterator[httpx.Client]:
    """One keep-alive connection to the gateway, in a cache namespace of the test's own."""
    standin.script.clear()
    with httpx.Client(base_url=gateway.url, timeout=60,
                      headers={"x-blendgate-cache-namespace": uuid.uuid4().hex}) as client:
        yield client


def chat(http: httpx.Client, stream: bool = False, namespace: str | None = None, **params: Any) -> httpx.Response:
    """Asks QUESTION; `namespace` replaces the test's cache namespace."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "stream": stream, **params}
    headers = {"x-blendgate-cache-namespace": namespace} if namespace else None
    return http.post("/v1/chat/completions", json=body, headers=headers)


def sse(response: httpx.Response) -> list[Any]:
    """The data of each SSE frame, decoded (the final [DONE] as the string)."""
    frames = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    return [frame if frame == "[DONE]" else json.loads(frame) for frame in frames]


def streamed_text(frames: list[Any]) -> str:
    return "".join(f["choices"][0]["delta"].get("content") or "" for f in frames
                   if isinstance(f, dict) and f.get("choices"))


# 1. Whatever reaches the model is in the semantic-cache key, unless shown not to change the answer
# (key by key, without a gateway: tests/unit/gateway/test_answer_cache_keys.py).

@pytest.mark.parametrize("name, low, high", [("reasoning_effort", "low", "high"),
                                             ("a_parameter_openai_adds_later", 1, 2)])
def test_a_forwarded_parameter_is_part_of_the_cache_key(http: httpx.Client, standin: OpenAIStandin, name: str,
                                                        low: Any, high: Any) -> None:
    first = chat(http, **{name: low})
    assert first.status_code == 200, first.text
    assert first.headers["x-blendgate-cache"] == "miss"
    again = chat(http, **{name: low})
    assert again.headers["x-blendgate-cache"] == "hit"
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    calls = len(standin.requests)
    other = chat(http, **{name: high})
    assert other.headers["x-blendgate-cache"] == "miss", f"{name}={high!r} was served the answer for {low!r}"
    assert len(standin.requests) == calls + 1
    assert other.json()["choices"][0]["message"]["content"] == f"answer {calls + 1}"
    if name in OPENAI_CHAT_PARAMS:
        assert standin.requests[-1][name] == high


def test_a_parameter_shown_not_to_change_the_answer_still_hits(http: httpx.Client) -> None:
    assert chat(http, user="alice").headers["x-blendgate-cache"] == "miss"
    assert chat(http, user="bob", metadata={"team": "x"}).headers["x-blendgate-cache"] == "hit"


# 3. An answer the gateway cannot interpret is a 502 upstream_error, never cached, and the connection survives.

MALFORMED_BODIES = {
    "no choices": {**completion(), "choices": []},
    "choices missing": {k: v for k, v in completion().items() if k != "choices"},
    "choices not a list": {**completion(), "choices": "Paris"},
    "choice without message": {**completion(), "choices": [{"index": 0, "finish_reason": "stop"}]},
    "message null": {**completion(), "choices": [{"index": 0, "message": None, "finish_reason": "stop"}]},
    "content of the wrong type": completion(5),
    "empty message": completion(None),
    "finish_reason of the wrong type": completion("Paris", finish_reason=5),
    "tool_calls of the wrong type": completion(None, tool_calls="call f"),
    "logprobs of the wrong type": completion("Paris", logprobs="high"),
    "usage of the wrong type": {**completion(), "usage": "many"},
    "a JSON list": [completion()],
}


@pytest.mark.parametrize("case", list(MALFORMED_BODIES) + ["not JSON"])
def test_a_malformed_answer_is_502_and_never_cached(http: httpx.Client, standin: OpenAIStandin, case: str) -> None:
    if case == "not JSON":
        standin.reply(text="<html>upstream proxy error</html>")
    else:
        standin.reply(json=MALFORMED_BODIES[case])
    error = assert_openai_error(chat(http), 502, "upstream_error")
    # Said in a line, without litellm's traceback (server paths) or a copy of the whole answer.
    assert "Traceback" not in error["message"] and "\n" not in error["message"] and len(error["message"]) <= 600
    # The same connection answers the next request, which reaches the provider: nothing was stored.
    calls = len(standin.requests)
    answer = chat(http)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-blendgate-cache"] == "miss"
    assert answer.json()["choices"][0]["message"]["content"] == f"answer {calls + 1}"


MALFORMED_STREAMS = {
    "only [DONE]": ["[DONE]"],
    "a whole completion with no choices": [{**completion(), "choices": []}, "[DONE]"],
    "deltas without content": [chunk({"role": "assistant"}), chunk({}, "stop"), "[DONE]"],
    "no delta at all": [{**chunk(), "choices": [{"index": 0, "finish_reason": "stop"}]}, "[DONE]"],
    "no finish reason": stream_of("Par", "is")[:-3] + ["[DONE]"],
    "content of the wrong type": [chunk({"role": "assistant", "content": 5}), chunk({}, "stop"), "[DONE]"],
    "a frame that is not JSON": ["garbage", "[DONE]"],
    "choices not a list": [{**chunk(), "choices": "Paris"}, "[DONE]"],
    "a delta of the wrong type": [{**chunk(), "choices": [{"index": 0, "delta": "Paris"}]}, chunk({}, "stop"),
                                  "[DONE]"],
}


@pytest.mark.parametrize("case", list(MALFORMED_STREAMS))
def test_a_malformed_stream_is_502_and_never_cached(http: httpx.Client, standin: OpenAIStandin, case: str) -> None:
    standin.reply(sse=MALFORMED_STREAMS[case])
    response = chat(http, stream=True)
    if case == "no finish reason":
        # Text went out before the stream broke: the error comes in the stream, as OpenAI sends it.
        assert response.status_code == 200
        frames = sse(response)
        assert frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "upstream_error"
    else:
        assert_openai_error(response, 502, "upstream_error")
    calls = len(standin.requests)
    answer = chat(http, stream=True)
    assert answer.status_code == 200 and answer.headers["x-blendgate-cache"] == "miss"
    assert streamed_text(sse(answer)) == f"answer {calls + 1}"


WRONG_VALUES = [None, 7, -1.5, "x", [], {}, [None], {"x": None}]


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON value (keys and list indexes), the value's own first."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        yield from _paths(inner, (*path, key))


def _replaced(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def test_no_field_of_an_upstream_answer_breaks_the_gateway(http: httpx.Client, standin: OpenAIStandin) -> None:
    """Every field of a good answer and of a good stream chunk, in turn set to values of other types: the
    gateway answers a well-formed completion or 502 upstream_error, never anything else."""
    good, good_chunk = completion("Paris"), chunk({"role": "assistant", "content": "Paris"})
    cases = [(False, _replaced(good, path, new)) for path in _paths(good) for new in WRONG_VALUES]
    cases += [(True, _replaced(good_chunk, path, new)) for path in _paths(good_chunk) for new in WRONG_VALUES]
    for stream, body in cases:
        if stream:
            standin.reply(sse=[body, chunk({}, "stop"), "[DONE]"])
        else:
            standin.reply(json=body)
        response = chat(http, stream=stream, namespace=uuid.uuid4().hex)  # each case reaches the provider
        assert not standin.script
        where = f"{'stream' if stream else 'answer'} {json.dumps(body)[:300]}"
        assert response.status_code in (200, 502), f"{where}: {response.status_code} {response.text[:300]}"
        if response.status_code == 502:
            assert_openai_error(response, 502, "upstream_error")
        elif stream:
            frames = sse(response)
            assert frames[-1] == "[DONE]", where
            for frame in frames[:-1]:
                assert "error" in frame or isinstance(frame["choices"][0]["delta"].get("content", ""), str), where
        else:
            message = response.json()["choices"][0]["message"]
            assert isinstance(message["content"], str) or message.get("tool_calls") or message.get("refusal"), where


def test_an_answer_cut_short_by_length_may_be_empty(http: httpx.Client, standin: OpenAIStandin) -> None:
    standin.reply(json=completion("", finish_reason="length"))
    response = chat(http, max_tokens=1)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": "length"}


# 4. Choice-level fields the provider returns are passed on as they came.

def test_logprobs_are_passed_on(http: httpx.Client, standin: OpenAIStandin) -> None:
    standin.reply(json=completion("Paris", logprobs=LOGPROBS))
    response = chat(http, logprobs=True, top_logprobs=1)
    assert response.status_code == 200, response.text
    assert standin.requests[-1]["logprobs"] is True and standin.requests[-1]["top_logprobs"] == 1
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Paris"
    assert choice["logprobs"] == LOGPROBS


def test_streamed_logprobs_are_passed_on(http: httpx.Client, standin: OpenAIStandin) -> None:
    first = {"content": LOGPROBS["content"][:1]}
    standin.reply(sse=[chunk({"role": "assistant", "content": ""}), chunk({"content": "Paris"}, logprobs=first),
                       chunk({}, "stop"), "[DONE]"])
    response = chat(http, stream=True, logprobs=True)
    assert response.status_code == 200, response.text
    frames = [f for f in sse(response) if isinstance(f, dict) and f.get("choices")]
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Paris"}
    assert frames[0]["choices"][0]["logprobs"] == first
    assert frames[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_reasoning_is_passed_on(http: httpx.Client, standin: OpenAIStandin) -> None:
    standin.reply(sse=[chunk({"role": "assistant", "reasoning_content": "France's capital..."}),
                       chunk({"content": "Paris"}), chunk({}, "stop"), "[DONE]"])
    frames = [f for f in sse(chat(http, stream=True)) if isinstance(f, dict) and f.get("choices")]
    deltas = [f["choices"][0]["delta"] for f in frames]
    assert any(d.get("reasoning_content") == "France's capital..." for d in deltas), deltas
    assert streamed_text(frames) == "Paris"
