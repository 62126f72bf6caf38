"""Chat completions through the official openai client against a live gateway with the embedded model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from support import EMBEDDED

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_answer_has_openai_shape_and_blendgate_report(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model=EMBEDDED, messages=QUESTION, max_tokens=30, temperature=0)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == EMBEDDED
    assert abs(completion.created - time.time()) < 600
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    report = completion.model_extra["blendgate"]
    assert report["backend"] == "local"
    assert report["request_id"] == completion.id
    assert set(report) >= {"timings", "semantic_cache", "rag", "chunk_cache"}
    timings = report["timings"]
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] <= timings["total_ms"]


def test_stream_yields_deltas_then_usage_and_report(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=EMBEDDED, messages=QUESTION, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == EMBEDDED for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0
    assert last.model_extra["blendgate"]["backend"] == "local"
    # The same question answered without streaming gives the same greedy text.
    whole = client.chat.completions.create(model=EMBEDDED, messages=QUESTION, max_tokens=30, temperature=0)
    assert whole.choices[0].message.content == text


def test_sse_frames_end_with_done_and_omit_usage_unless_asked(http: httpx.Client) -> None:
    body = {"model": EMBEDDED, "messages": QUESTION, "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    frames = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert all("usage" not in f for f in frames)
    assert frames[-1]["choices"][0]["finish_reason"] == "length"
    assert "blendgate" in frames[-1] and all("blendgate" not in f for f in frames[:-1])


def test_max_tokens_and_max_completion_tokens_limit_the_answer(client: openai.OpenAI) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    short = client.chat.completions.create(model=EMBEDDED, messages=story, max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3
    shorter = client.chat.completions.create(model=EMBEDDED, messages=story, max_completion_tokens=2)
    assert shorter.usage.completion_tokens == 2


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "List the days of the week, separated by commas."}]
    full = client.chat.completions.create(model=EMBEDDED, messages=prompt, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(model=EMBEDDED, messages=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=EMBEDDED, messages=prompt, max_tokens=40, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    prompt = [{"role": "user", "content": "Tell me a fun fact."}]

    def sample(seed: int) -> str:
        return client.chat.completions.create(model=EMBEDDED, messages=prompt, max_tokens=12, temperature=1.0,
                                              top_p=0.95, seed=seed).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_concurrent_requests_do_not_corrupt_each_other(client: openai.OpenAI, gateway) -> None:
    prompts = [f"Write one sentence about the number {n}." for n in (3, 7, 11)]

    def ask(prompt: str) -> str:
        return client.chat.completions.create(model=EMBEDDED, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=16, temperature=0.8, seed=42).choices[0].message.content

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert gateway.health()["models"][EMBEDDED]["running"] == 0


def test_client_disconnect_frees_its_generation(gateway, http: httpx.Client) -> None:
    body = {"model": EMBEDDED, "stream": True, "max_tokens": 4000, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long essay on the history of Rome."}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert gateway.health()["models"][EMBEDDED]["running"] == 1
    deadline = time.monotonic() + 10
    while gateway.health()["models"][EMBEDDED]["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway.health()["models"][EMBEDDED]["running"] == 0


def test_models_list_and_health(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids == [EMBEDDED, "upstream-smol", "dead-upstream", "facts-rag"]
    assert client.models.retrieve(EMBEDDED).id == EMBEDDED
    health = http.get("/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ready"
