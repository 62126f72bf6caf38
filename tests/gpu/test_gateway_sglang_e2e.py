"""Issue 20, end to end as deployed: a blendgate gateway process (`blendgate serve`) in front of an SGLang worker
with blendgate's plugin, asked RAG questions over a collection it ingested, through the openai client.

- the answer to a RAG question streams and completes, and carries the worker's blend report (chunks sent, each
  a chunk-cache miss, the worker named);
- a second question retrieving the same chunks reports chunk-cache hits and recomputes fewer chunk tokens than
  it reuses;
- the gateway's /metrics counts the requests, the chunk-cache lookups (hits and misses) and the blend (recompute
  ratio, prefill tokens saved), and /healthz the worker's totals.

The same tests run against two workers (the `worker` fixture):
- "standin": tests/sglang_standin.py, SGLang's HTTP API over blendgate's local engine on the CPU: everything but
  SGLang itself, everywhere (the CI included);
- "sglang": a real SGLang 0.5.15 server with the plugin (support.SglangServer: bf16, the radix cache and CUDA
  graphs on) serving the embedded SmolLM2-135M-Instruct's real weights, converted from the GGUF that the gateway
  reads its tokenizer from; needs CUDA and SGLang, skipped otherwise. On the GPU machine the gateway's packages
  come from bench/device/gateway_bundle.sh, and the lead runs `bash bench/device/gpu_check.sh gateway-e2e`.

tests/e2e/test_sglang_backend.py holds the gateway's SGLang backend to the stand-in in detail (inline documents,
routing, every failure); here the request comes through a collection and the model's `rag` setting, and the
metrics are read, as an operator would see them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterator

import pytest
import torch

# The gateway's own packages: in the gateway bundle (gateway_receive.sh), not on a bare GPU machine.
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

# The gateway fixtures (workdir, model_cache_dir) and helpers come from tests/conftest.py and tests/support.py,
# which `--confcutdir tests/gpu` (how the other GPU tests run) leaves out: the module then skips itself.
support = pytest.importorskip("support", reason="needs tests/conftest.py: run it without --confcutdir tests/gpu "
                                                "(bash bench/device/gpu_check.sh gateway-e2e)")
GatewayProcess, SglangServer, SglangStandin = support.GatewayProcess, support.SglangServer, support.SglangStandin

MODEL = "rag-sgl"
COLLECTION = "castles"
FACTS = [
    {"source": "castle", "text": "The blue castle's secret code is 4471. It was set by the castle's first keeper, "
                                 "Edda Marrow, in the winter of the great flood."},
    {"source": "river", "text": "The Silverrun river is 312 kilometres long and flows into the Grey Sea near "
                                "Portwick, where the old ferry still runs twice a day."},
    {"source": "bakery", "text": "The corner bakery on Elm Street sells rye bread only on Tuesdays and closes "
                                 "at noon on Sundays."},
]
QUESTION = "What is the secret code of the blue castle?"
SECOND_QUESTION = "Who set the secret code of the blue castle, and when?"
# The worker's chunk-cache is measured against blending short documents: no per-chunk cost, so they blend
# (support.BLEND_ALWAYS, for the plugin).
PLUGIN_ENV = {"BLENDGATE_SGLANG_PASS_COST_TOKENS": "0", "BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS": "0",
              "BLENDGATE_SGLANG_GPU_CACHE_GB": "1", "BLENDGATE_SGLANG_CPU_CACHE_GB": "1"}


@pytest.fixture(scope="module", params=["standin", "sglang"])
def worker(request: pytest.FixtureRequest, workdir: Path, model_cache_dir: Path) -> Iterator[SglangStandin]:
    """The SGLang worker the gateway fronts: the CPU stand-in, or a real SGLang server on the GPU machine;
    launched, not yet ready (`deployed` waits for it while the gateway starts)."""
    if request.param == "standin":
        process = SglangStandin("e2e-standin", workdir, model_cache_dir).launch()
    else:
        if not torch.cuda.is_available():
            pytest.skip("a real SGLang worker needs a CUDA device")
        if importlib.util.find_spec("sglang") is None:
            pytest.skip("needs SGLang (bench/device/sglang_bundle.sh brings it to the GPU machine)")
        from blendgate.engine.weights import resolve_model_folder

        # The embedded model's real weights, as the safetensors folder the gateway converts its GGUF to.
        model_dir = resolve_model_folder(None, model_cache_dir)
        process = SglangServer("e2e-sglang", workdir, model_dir, PLUGIN_ENV).launch()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def deployed(worker: SglangStandin, workdir: Path, model_cache_dir: Path) -> Iterator[GatewayProcess]:
    """`blendgate serve` with one RAG-enabled SGLang model on `worker`, its collection ingested over HTTP.
    The semantic cache is off: a question it answered would never reach the worker (it has tests of its own)."""
    config = {
        "models": [{"name": MODEL, "backend": "sglang", "workers": [worker.url], "health_interval_s": 0.5,
                    "max_context_tokens": 2048, "sampling_defaults": {"temperature": 0.0, "top_p": 1.0},
                    "rag": {"collection": COLLECTION, "top_k": len(FACTS)}}],
        "retrieval": {"data_dir": str(workdir / f"{worker.name}-collections")},
        "semantic_cache": {"enabled": False},
    }
    process = GatewayProcess(f"{worker.name}-gateway", config, workdir, model_cache_dir).launch()
    try:
        worker.wait_ready(timeout_s=600)  # SGLang: loading, then capturing CUDA graphs
        process.wait_ready()
        ingested = httpx.post(f"{process.url}/v1/collections/{COLLECTION}/documents", json={"documents": FACTS},
                              timeout=120)
        assert ingested.status_code == 200 and ingested.json()["chunks"] == len(FACTS), ingested.text
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def rag_client(deployed: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployed.url}/v1", api_key="not-needed", max_retries=0, timeout=300)


def test_a_rag_answer_streams_and_carries_the_workers_blend_report(rag_client: openai.OpenAI,
                                                                   worker: SglangStandin) -> None:
    stream = rag_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, stream=True)
    pieces = list(stream)
    answer = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    finishes = [p.choices[0].finish_reason for p in pieces if p.choices and p.choices[0].finish_reason]
    assert answer.strip() and finishes in (["stop"], ["length"]), (answer, finishes)
    extra = pieces[-1].model_extra["blendgate"]
    assert extra["backend"] == "sglang"
    assert {c["source"] for c in extra["rag"]["chunks"]} == {f["source"] for f in FACTS}
    report = extra["chunk_cache"]
    assert report["worker"] == worker.url and report["chunks_sent"] == len(FACTS), report
    assert report["mode"] == "blend" and report["hits"] == [False] * len(FACTS), report
    assert 0 < report["recomputed_tokens"] < report["chunk_tokens"], report
    if isinstance(worker, SglangStandin):
        # The local engine's float32 SmolLM2 reads the code from its documents; SGLang's bf16 one is held to the
        # blend report, not to the wording of a 135M model's answer.
        assert "4471" in answer, answer


def test_a_second_question_over_the_same_chunks_hits_the_workers_chunk_cache(rag_client: openai.OpenAI,
                                                                             worker: SglangStandin) -> None:
    answer = rag_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECOND_QUESTION}],
                                            max_tokens=24)
    assert answer.choices[0].message.content.strip() and answer.choices[0].finish_reason in ("stop", "length")
    report = answer.model_extra["blendgate"]["chunk_cache"]
    assert report["worker"] == worker.url and report["mode"] == "blend", report
    assert report["hits"] == [True] * len(FACTS), report
    assert report["recomputed_tokens"] < report["chunk_tokens"] - report["recomputed_tokens"], report
    assert answer.usage.prompt_tokens > report["chunk_tokens"] and answer.usage.completion_tokens > 0


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text as {(sample name, its labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_gateways_metrics_show_the_requests_and_the_blend(deployed: GatewayProcess) -> None:
    samples = _samples(httpx.get(f"{deployed.url}/metrics", timeout=10).text)

    def total(name: str, **labels: str) -> float:
        return sum(v for (n, ls), v in samples.items()
                   if n == name and ls >= frozenset({"model": MODEL, **labels}.items()))

    assert total("blendgate_requests_total", status="200") == 2
    assert total("blendgate_time_to_first_token_seconds_count") == 2
    assert total("blendgate_chunk_cache_lookups_total", result="miss") == len(FACTS)
    assert total("blendgate_chunk_cache_lookups_total", result="hit") == len(FACTS)
    assert total("blendgate_blend_recompute_ratio_count") == 2
    assert total("blendgate_blend_prefill_tokens_saved_total") > 0
    assert total("blendgate_completion_tokens_total") > 0
    health = deployed.health()["models"][MODEL]
    assert health["state"] == "ready" and health["requests"] == 2
    assert health["chunks_sent"] == 2 * len(FACTS) and health["chunks_reused"] == len(FACTS)
