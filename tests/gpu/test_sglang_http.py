"""The gateway's side of the contract against a real SGLang 0.5.15 HTTP server with blendgate's plugin (the CPU
tests hold the gateway to a stand-in of it): the body the gateway sends (protocol.generate_request) is
accepted, the answer streams as SSE events of output ids and meta_info, and the first event already carries
the plugin's blend report, which is where the gateway reads it.

Needs CUDA and SGLang; skipped otherwise. Uses the tiny random Llama of conftest.py, without a
tokenizer (--skip-tokenizer-init), so events carry token ids and no text.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs SGLang")]

def free_port() -> int:
    """A free loopback port at most 55000: SGLang opens more above its own (gRPC at + 10000), which an
    ephemeral port (up to 60999) pushes past 65535 (tests/support.py: free_port says the same)."""
    for _ in range(200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", random.randint(20000, 55000)))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free loopback port at most 55000")


@pytest.fixture(scope="module")
def server(model_dir):
    import httpx

    port = free_port()
    # No per-chunk cost in the blend-or-full-prefill rule (as test_sglang_worker.py and the e2e test): the tiny
    # model's calibrated pass cost makes a prompt of 4 uncached 64-token chunks "slower than a full prefill", and
    # this test is about the stream's first event carrying the blend report (the H200, 2026-12-02).
    env = {**os.environ, "BLENDGATE_SGLANG_PLUGIN": "1", "BLENDGATE_SGLANG_PASS_COST_TOKENS": "0",
           "BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir),
                                "--skip-tokenizer-init", "--disable-cuda-graph",  # the radix cache on, as deployed
                                "--mem-fraction-static", "0.3", "--port", str(port), "--log-level", "warning"],
                               env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "SGLang's server exited while starting"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        process.kill()
        pytest.fail("SGLang's server did not become healthy in 300 s")
    yield url
    process.terminate()
    process.wait(60)


def stream(url: str, body: dict) -> list[dict]:
    import httpx

    events = []
    with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    return events


def test_the_gateways_request_streams_with_the_blend_report_first(server, prompt) -> None:
    from blendgate.sglang_plugin.protocol import generate_request, prompt_of, report_of

    ids, spans = prompt
    chat_prompt = prompt_of(ids, {"blendgate_chunk_spans": spans, "blendgate_prefill_mode": "blend",
                                  "blendgate_recompute_ratio": 0.15})
    sampling = {"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "frequency_penalty": 0.0,
                "presence_penalty": 0.0}
    for attempt in ("miss", "hit"):
        events = stream(server, generate_request(chat_prompt, sampling, rid=f"bg-test-{attempt}"))
        assert events, "no events"
        report = report_of(events[0]["meta_info"])
        assert report["mode"] == "blend" and report["chunk_tokens"] == 256, events[0]["meta_info"]
        assert report["hit_count"] == (4 if attempt == "hit" else 0)
        final = events[-1]["meta_info"]
        assert final["finish_reason"]["type"] == "length" and final["completion_tokens"] == 5
        # Output ids arrive cumulatively (each event holds all so far), as SGLang's default stream_output.
        assert len(events[-1]["output_ids"]) == 5
        assert all(events[-1]["output_ids"][:len(e["output_ids"])] == e["output_ids"] for e in events)


def test_a_plain_request_has_no_report(server, prompt) -> None:
    from blendgate.engine.prompt import Prompt
    from blendgate.sglang_plugin.protocol import generate_request, report_of

    ids, _ = prompt
    events = stream(server, generate_request(Prompt.plain(ids), {"max_new_tokens": 3, "temperature": 0.0}))
    assert report_of(events[0]["meta_info"]) == {} and events[-1]["meta_info"]["completion_tokens"] == 3
