"""The gateway's SGLang backend against stand-in workers that speak SGLang's HTTP API (tests/sglang_standin.py,
backed by the local engine: SGLang does not run on a CPU): answers, streaming, chunk spans and the workers'
blend reports, cache-affinity routing, and every failure mapped to an OpenAI error."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from support import EMBEDDED, GatewayProcess, SglangStandin, assert_openai_error, free_port

DOCUMENTS = ["The blue castle's secret code is 4471. It was set by the castle's first keeper, Edda Marrow.",
             "The Silverrun river is 312 kilometres long and flows into the Grey Sea near Portwick."]
QUESTION = "What is the secret code of the blue castle?"


@pytest.fixture(scope="module")
def launched_workers(workdir: Path, model_cache_dir: Path) -> Iterator[list[SglangStandin]]:
    """Two stand-in workers, launched side by side (and beside the gateway): `workers` waits for them."""
    launched = [SglangStandin(f"sglang-{i}", workdir, model_cache_dir).launch() for i in (1, 2)]
    yield launched
    for worker in launched:
        worker.stop()


@pytest.fixture(scope="module")
def workers(launched_workers: list[SglangStandin]) -> list[SglangStandin]:
    return [worker.wait_ready() for worker in launched_workers]


@pytest.fixture(scope="module")
def sgl_gateway(launched_workers: list[SglangStandin], workdir: Path,
                model_cache_dir: Path) -> Iterator[GatewayProcess]:
    workers = launched_workers
    greedy = {"temperature": 0.0, "top_p": 1.0}
    # A generous read timeout where the stand-in computes chunks and their contexts on the CPU before its first
    # event (several seconds on a loaded 2-core machine); a short one where a test waits for the 504.
    sglang = {"backend": "sglang", "health_interval_s": 0.5, "read_timeout_s": 60, "max_context_tokens": 2048,
              "sampling_defaults": greedy}
    config = {
        "models": [
            {"name": EMBEDDED, "backend": "local", "sampling_defaults": greedy},
            {"name": "sgl", "workers": [w.url for w in workers], **sglang},
            {"name": "sgl-second", "workers": [workers[1].url], **sglang, "read_timeout_s": 5},
            {"name": "sgl-nowhere", "workers": [f"http://127.0.0.1:{free_port()}"], **sglang},
        ],
        "retrieval": {"data_dir": str(workdir / "sglang-collections")},
        "semantic_cache": {"enabled": False},
    }
    process = GatewayProcess("sglang-gateway", config, workdir, model_cache_dir).launch()
    for worker in workers:
        worker.wait_ready()
    # sgl-nowhere is never ready, so the gateway as a whole is not: wait for the other models.
    yield process.wait_ready(ready_models=["sgl", "sgl-second", EMBEDDED])
    process.stop()


@pytest.fixture(scope="module")
def sgl_client(sgl_gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sgl_gateway.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str, content: str, **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                          max_tokens=options.pop("max_tokens", 24), **options)


def test_answers_are_the_local_engines_streamed_or_not(sgl_client: openai.OpenAI) -> None:
    local = ask(sgl_client, EMBEDDED, "Name three colours.")
    remote = ask(sgl_client, "sgl", "Name three colours.")
    assert remote.choices[0].message.content == local.choices[0].message.content  # same tokens went over the wire
    assert remote.usage.prompt_tokens == local.usage.prompt_tokens
    assert remote.model_extra["blendgate"]["backend"] == "sglang"
    assert remote.choices[0].finish_reason in ("stop", "length")
    pieces = list(ask(sgl_client, "sgl", "Name three colours.", stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == local.choices[0].message.content
    assert pieces[-1].model_extra["blendgate"]["backend"] == "sglang"
    stopped = ask(sgl_client, "sgl", "Count from one to ten, one number a line.", stop=["\n"], max_tokens=30)
    assert "\n" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"


def test_chunks_go_to_the_worker_that_holds_them_and_come_back_blended(sgl_client: openai.OpenAI) -> None:
    first = ask(sgl_client, "sgl", QUESTION, extra_body={"documents": DOCUMENTS})
    report = first.model_extra["blendgate"]["chunk_cache"]
    assert report["mode"] == "blend" and report["chunks_sent"] == 2 and report["hits"] == [False, False]
    again = ask(sgl_client, "sgl", "Who set the code of the blue castle?", extra_body={"documents": DOCUMENTS})
    report_again = again.model_extra["blendgate"]["chunk_cache"]
    assert report_again["worker"] == report["worker"], "affinity: the worker holding the chunks gets the request"
    assert report_again["hits"] == [True, True] and report_again["recomputed_tokens"] < report_again["chunk_tokens"]
    assert "4471" in first.choices[0].message.content
    # The request's own blend settings travel to the worker.
    full = ask(sgl_client, "sgl", QUESTION, extra_body={"documents": DOCUMENTS, "blend": {"mode": "full_prefill"}})
    assert full.model_extra["blendgate"]["chunk_cache"]["mode"] == "full_prefill"


def test_requests_the_workers_cannot_take_get_openai_errors(sgl_gateway: GatewayProcess) -> None:
    url = f"{sgl_gateway.url}/v1/chat/completions"

    def post(model: str, content: str, **extra) -> httpx.Response:
        return httpx.post(url, json={"model": model, "messages": [{"role": "user", "content": content}],
                                     "max_tokens": 8, **extra}, timeout=60)

    assert_openai_error(post("sgl", "word " * 3000), 413, "context_length_exceeded")
    assert_openai_error(post("sgl", "hi", tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                        "unsupported_parameter")
    nowhere = post("sgl-nowhere", "hi")
    assert nowhere.status_code in (502, 503), nowhere.text  # refused (502), or known down already (503)
    assert_openai_error(nowhere, nowhere.status_code)
    health = httpx.get(f"{sgl_gateway.url}/healthz", timeout=5).json()
    assert health["status"] == "degraded" and health["models"]["sgl-nowhere"]["state"] == "unavailable"


def test_a_silent_worker_gives_504_and_a_failing_one_502(sgl_gateway: GatewayProcess,
                                                          workers: list[SglangStandin]) -> None:
    url = f"{sgl_gateway.url}/v1/chat/completions"
    body = {"model": "sgl-second", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        workers[1].fault(delay_s=12)
        started = time.monotonic()
        assert_openai_error(httpx.post(url, json=body, timeout=60), 504, "upstream_timeout")
        assert time.monotonic() - started < 12, "the gateway waited out the worker instead of its read timeout"
        workers[1].fault(status=500)
        error = assert_openai_error(httpx.post(url, json=body, timeout=60), 502, "upstream_error")
        assert "injected failure" in error["message"]
    finally:
        workers[1].fault()
    assert httpx.post(url, json=body, timeout=60).status_code == 200


@pytest.mark.parametrize("event", [[1, 2], {"text": 5}, {"text": "Paris", "meta_info": "done"},
                                   {"text": "Paris", "meta_info": {"cached_tokens": [1]}},
                                   {"text": "Paris", "meta_info": {"finish_reason": 7}}])
def test_an_event_of_the_wrong_shape_is_502_upstream_error(sgl_gateway: GatewayProcess,
                                                            workers: list[SglangStandin], event) -> None:
    url = f"{sgl_gateway.url}/v1/chat/completions"
    body = {"model": "sgl-second", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        workers[1].fault(event=event)
        error = assert_openai_error(httpx.post(url, json=body, timeout=60), 502, "upstream_error")
        assert "unreadable event" in error["message"]
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
            assert response.status_code == 200
            frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert frames[-1] == "[DONE]" and json.loads(frames[-2])["error"]["code"] == "upstream_error"
    finally:
        workers[1].fault()
    assert httpx.post(url, json=body, timeout=60).status_code == 200


def test_a_worker_dying_mid_answer_ends_the_stream_with_an_error_and_traffic_moves_on(
        sgl_gateway: GatewayProcess, sgl_client: openai.OpenAI, workers: list[SglangStandin]) -> None:
    workers[1].fault(die_after_events=2)
    body = {"model": "sgl-second", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40,
            "stream": True}
    with httpx.stream("POST", f"{sgl_gateway.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        frames = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["code"] == "upstream_error" and error["type"]
    # Its socket closes before its exit is complete: on a loaded machine the stream can end first.
    workers[1].process.wait(timeout=10)
    assert not workers[1].running
    # "sgl" has the dead worker too: its requests go to the live one, however they are routed.
    for i in range(3):
        answer = ask(sgl_client, "sgl", f"Say the number {i}.", extra_body={"documents": [f"Note {i}: hello."]})
        assert answer.model_extra["blendgate"]["chunk_cache"]["worker"] == workers[0].url
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = httpx.get(f"{sgl_gateway.url}/healthz", timeout=5).json()["models"]["sgl"]
        down = {w["url"]: w for w in state["workers"]}[workers[1].url]
        if not down["healthy"]:
            break
        time.sleep(0.3)
    assert not down["healthy"] and down["last_error"] and state["state"] == "ready"
    assert state["requests"] >= 3 and state["chunks_sent"] >= 3


def test_a_worker_url_password_is_shown_nowhere(workdir: Path, model_cache_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    config = {"models": [{"name": "sgl-secret", "backend": "sglang", "health_interval_s": 0.5,
                          "workers": [f"http://ops:p@ss-S3CRET@127.0.0.1:{port}"]}],
              "retrieval": {"data_dir": str(tmp_path / "collections")}, "semantic_cache": {"enabled": False}}
    process = GatewayProcess("sglang-secret", config, workdir, model_cache_dir).launch()
    try:
        deadline = time.monotonic() + 240
        while True:  # until the tokenizer is loaded and the dead worker found out
            assert process.process is not None and process.process.poll() is None, process.log()
            assert time.monotonic() < deadline, process.log()
            try:
                health = httpx.get(f"{process.url}/healthz", timeout=5)
                if health.json()["models"]["sgl-secret"]["state"] == "unavailable":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert "S3CRET" not in health.text
        assert health.json()["models"]["sgl-secret"]["workers"][0]["url"] == f"http://ops:***@127.0.0.1:{port}"
        answer = httpx.post(f"{process.url}/v1/chat/completions", timeout=30,
                            json={"model": "sgl-secret", "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code >= 500 and "S3CRET" not in answer.text
    finally:
        process.stop()
    assert "S3CRET" not in process.log()


def test_retrieved_chunks_reach_the_worker_with_their_document_contexts(sgl_gateway: GatewayProcess,
                                                                        sgl_client: openai.OpenAI) -> None:
    # A document of three chunks (retrieval.chunk_tokens 256): the second and third travel with their
    # predecessors as contexts (blendgate_chunk_context_lengths/_ids), which the worker blends after.
    archive = " ".join(f"Room {i} of the harbour archive holds the ledgers of the year {1800 + i}, bound in "
                       f"{'red' if i % 2 else 'green'} leather." for i in range(30))
    with httpx.Client(base_url=sgl_gateway.url, timeout=120) as http:
        deadline = time.monotonic() + 120  # this gateway waits for its models only; the retriever loads after
        while http.get("/healthz").json()["retrieval"]["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.2)
        ingested = http.post("/v1/collections/archive/documents",
                             json={"documents": [{"source": "archive", "text": archive}]})
    assert ingested.status_code == 200 and ingested.json()["chunks"] >= 3, ingested.text
    rag = {"rag": {"collection": "archive", "top_k": 3}}
    question = "Which room holds the ledgers of the year 1815?"
    remote = ask(sgl_client, "sgl", question, max_tokens=8, temperature=0, extra_body=rag)
    report = remote.model_extra["blendgate"]["chunk_cache"]
    assert report["mode"] == "blend" and report["chunks_sent"] == 3 and "fallback" not in report
    # The same prompt, contexts included, as the local engine blends it: the same answer.
    local = ask(sgl_client, EMBEDDED, question, max_tokens=8, temperature=0, extra_body=rag)
    assert remote.choices[0].message.content == local.choices[0].message.content
    again = ask(sgl_client, "sgl", question, max_tokens=8, temperature=0, extra_body=rag)
    assert again.model_extra["blendgate"]["chunk_cache"]["hits"] == [True, True, True]
