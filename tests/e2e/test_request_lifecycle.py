"""A live gateway while requests run: heavy requests leave the event loop free, and a client that leaves a
non-streamed request stops its generation (streams: tests/unit/gateway/test_stream_release.py).

The gateway is conftest's cache_gateway, with the default body limit (8 MiB), so that a body of megabytes gets
in, and the semantic cache on (its embedded store), which embeds and classifies every question before the model.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support import EMBEDDED, GatewayProcess, assert_openai_error, wait_until

# The goal is 100 ms; CI is a loaded 2-core machine, where tokenising on the loop stalled /healthz 16 s.
HEALTHZ_BOUND_S = 1.0
# A prompt a small model keeps answering for a long time at temperature 0.
COUNTING = {"role": "user", "content": "Count from 1 to 2000, one number per line, without stopping."}


def running(gateway: GatewayProcess) -> int:
    """Generations the local engine is working on (from /healthz)."""
    return gateway.health()["models"][EMBEDDED]["running"]


def test_healthz_answers_while_a_body_of_megabytes_is_tokenised(cache_gateway: GatewayProcess) -> None:
    text = ("the quick brown fox jumps over the lazy dog " * 120_000)[:5_000_000]  # ~1M tokens, under 8 MiB
    body = {"model": EMBEDDED, "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    answer: dict[str, httpx.Response] = {}
    sender = threading.Thread(target=lambda: answer.update(response=httpx.post(
        f"{cache_gateway.url}/v1/chat/completions", json=body, timeout=300)))
    sender.start()
    latencies = []
    while sender.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{cache_gateway.url}/healthz", timeout=60).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    sender.join()
    # The prompt is refused once its tokens are counted: the request really was tokenised meanwhile.
    error = assert_openai_error(answer["response"], 413, "context_length_exceeded")
    assert "8192 tokens" in error["message"]
    assert max(latencies) < HEALTHZ_BOUND_S, f"/healthz took {max(latencies):.2f} s while the body was tokenised"
    assert len(latencies) >= 5, latencies


def abandon(gateway: GatewayProcess, body: dict) -> None:
    """Send `body` and give up before the answer is complete, closing the connection: a non-streamed request
    after 3 s (a read timeout), a stream after its first frames."""
    url = f"{gateway.url}/v1/chat/completions"
    if not body.get("stream"):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=body, timeout=3)
        return
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        frames = 0
        for line in response.iter_lines():
            frames += line.startswith("data: ")
            if frames == 5:
                break


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_a_client_that_leaves_stops_its_generation(cache_gateway: GatewayProcess, stream: bool) -> None:
    wait_until(lambda: running(cache_gateway) == 0, "the engine is idle before the test", timeout_s=30, poll_s=0.05)
    metrics_url = f"{cache_gateway.url}/metrics"
    closed_before = closed_requests(httpx.get(metrics_url, timeout=10).text)
    # Long before 4000 tokens are generated, the client leaves.
    body = {"model": EMBEDDED, "messages": [COUNTING], "max_tokens": 4000, "temperature": 0, "stream": stream}
    client = threading.Thread(target=abandon, args=(cache_gateway, body))
    client.start()
    wait_until(lambda: running(cache_gateway) == 1, "the generation starts", timeout_s=3, poll_s=0.05)
    client.join()
    # Freed at the engine's next step; a non-streamed generation used to run to its end.
    wait_until(lambda: running(cache_gateway) == 0, "the abandoned generation stops", timeout_s=3, poll_s=0.05)
    # The engine answers the next request at once.
    reply = httpx.post(f"{cache_gateway.url}/v1/chat/completions", timeout=60,
                       json={"model": EMBEDDED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                             "cache": {"no-cache": True, "no-store": True}})
    assert reply.status_code == 200 and reply.json()["blendgate"]["timings"]["queue_ms"] < 1000
    if not stream:  # counted as nginx's "client closed request" (a stream had answered 200 already)
        assert closed_requests(httpx.get(metrics_url, timeout=10).text) == closed_before + 1


def closed_requests(metrics: str) -> float:
    """Chat requests counted with status 499 in blendgate_requests_total."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("blendgate_requests_total{") and 'status="499"' in line)
