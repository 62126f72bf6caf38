"""Issues 7 and 20 on the GPU: SGLang 0.5.15 with blendgate's plugin against stock SGLang and against the
local engine's blend, on a tiny random-weight Llama (the same safetensors file loaded by all of them).

- recompute ratio 1.0: the plugin's prefill (blendgate's kernels, KV written into SGLang's pool) gives stock
  SGLang's next-token log-probabilities, and decoding over that pool continues as stock SGLang does;
- ratio 0.15: the plugin gives the local engine's blend (ChunkBlender on the same weights), and reports it;
- a mixed extend batch (a blending request, a plain one, and the first piece of a plain prompt split by
  chunked prefill) is one pass of the plugin's: the blending request blends, the plain ones get stock SGLang's
  log-probabilities;
- two blending requests in one pass (one plugin pass: their misses computed side by side once, their blends
  batched layer by layer) give what each gives blended alone;
- the radix cache on: the same RAG request twice blends twice alike, no blended token is ever matched as a
  prefix (cached_tokens), and plain requests sharing the system prompt get it from the radix cache, also when
  batched with a blending request (the plugin reads their cached prefix from SGLang's pool); a RAG request
  found in the tree past its first chunk blends the chunks after that exact prefix (at ratio 1: stock's).

Needs CUDA and SGLang (bench/device/sglang_bundle.sh brings it to the GPU machine); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from blendgate.sglang_plugin.protocol import report_of

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs SGLang")]

TOP = 20
# SGLang's logits are bf16: at these magnitudes (4 to 16) one step is 1/32 to 1/16, and two computations of
# the same layers in a different order land a step or two apart (seen: 0.061 in one decode step).
BF16_LOGITS = 0.125


SYSTEM = 32  # the fixture prompt's first segment (system prompt), before its first chunk
CHUNKED_PREFILL = 512  # room for the RAG prompt (304 tokens), a short one (44) and a piece of a longer one


def generate(model_dir, plugin: bool, requests: list[dict], profile: bool = False, **server_args) -> list:
    """Each request in turn (one generate call each: a request, or a batch of them as lists, which SGLang's
    scheduler receives at once and prefills as one extend batch). `profile`: the plugin times its passes."""
    import sglang

    os.environ["BLENDGATE_SGLANG_PLUGIN"] = "1" if plugin else "0"  # read by SGLang's scheduler process
    os.environ["BLENDGATE_SGLANG_PROFILE"] = "1" if profile else "0"
    # No per-chunk cost: the ratio-1 request blends (its chunk passes and placements would otherwise make it
    # "slower than a full prefill", chunkcache/fallback.py, and the plugin would compute it exactly instead).
    os.environ["BLENDGATE_SGLANG_PASS_COST_TOKENS"] = os.environ["BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS"] = "0"
    engine = sglang.Engine(**{**dict(model_path=str(model_dir), skip_tokenizer_init=True, disable_radix_cache=True,
                                     mem_fraction_static=0.3, dtype="bfloat16", random_seed=0, log_level="error",
                                     disable_cuda_graph=True), **server_args})
    try:
        return [engine.generate(**request) for request in requests]
    finally:
        engine.shutdown()


def request(ids, spans=None, ratio=None, tokens=6) -> dict:
    sampling = {"max_new_tokens": tokens, "temperature": 0.0}
    if spans:
        sampling["custom_params"] = {"blendgate_chunk_spans": spans, "blendgate_prefill_mode": "blend",
                                     "blendgate_recompute_ratio": ratio}
    return {"input_ids": ids, "sampling_params": sampling, "return_logprob": True, "top_logprobs_num": TOP}


def batch(*requests: dict) -> dict:
    """One generate call for several requests (each made by `request`)."""
    return {"input_ids": [r["input_ids"] for r in requests],
            "sampling_params": [r["sampling_params"] for r in requests],
            "return_logprob": True, "top_logprobs_num": TOP}


def top_logprobs(output, step: int = 0) -> dict[int, float]:
    return {token: logprob for logprob, token, _ in output["meta_info"]["output_top_logprobs"][step]}


@pytest.fixture(scope="module")
def plain_prompts(prompt) -> dict[str, list[int]]:
    """Prompts without chunks: three sharing the RAG prompt's system prompt (their first question tokens 5, 6, 7
    lie outside the fixture's draw, so no prompt shares more than the system prompt with another), and a long one
    that chunked prefill splits."""
    ids, _ = prompt
    generator = torch.Generator().manual_seed(2)
    draw = lambda n: torch.randint(10, 1024, (n,), generator=generator).tolist()  # noqa: E731
    system = ids[:SYSTEM]
    return {"short": system + [5] + draw(11), "p1": system + [6] + draw(15), "p2": system + [7] + draw(15),
            "long": draw(CHUNKED_PREFILL + 104)}


@pytest.fixture(scope="module")
def stock(model_dir, prompt, plain_prompts) -> dict[str, dict]:
    """Stock SGLang's answers (a stock worker ignores the spans): the RAG prompt, and each plain prompt."""
    ids, spans = prompt
    names = ["rag", *plain_prompts]
    found = generate(model_dir, False, [request(ids, spans, 1.0)] + [request(plain_prompts[n]) for n in names[1:]])
    return dict(zip(names, found))


@pytest.fixture(scope="module")
def shared_miss_prompts(prompt) -> tuple[list[int], list[int], list[int]]:
    """Two RAG prompts of three chunks sharing one nobody has asked for before (and two of the fixture prompt's,
    in another order in the second): 240 tokens each, so both fit one extend batch of CHUNKED_PREFILL tokens (a
    prompt split by chunked prefill would blend its second piece after the first as an exact head)."""
    ids, spans = prompt
    generator = torch.Generator().manual_seed(3)
    new = torch.randint(10, 1024, (64,), generator=generator).tolist()
    chunks = [ids[spans[2 * n]:spans[2 * n + 1]] for n in range(2)]
    system, question = ids[:spans[0]], ids[spans[-1]:]
    first = system + new + chunks[0] + chunks[1] + question
    second = system + chunks[1] + chunks[0] + new + question
    return first, second, spans[:6]


@pytest.fixture(scope="module")
def outputs(model_dir, prompt, stock, plain_prompts, shared_miss_prompts):
    """The plugin's answers: the RAG prompt at ratio 1, at 0.15, without chunks, a mixed batch; then the two
    prompts sharing a new chunk batched (one pass), and each alone after."""
    ids, spans = prompt
    first, second, shared_spans = shared_miss_prompts
    plugin = generate(model_dir, True, [request(ids, spans, 1.0), request(ids, spans, 0.15), request(ids),
                                        batch(request(ids, spans, 0.15), request(plain_prompts["short"]),
                                              request(plain_prompts["long"])),
                                        batch(request(first, shared_spans, 0.15), request(second, shared_spans, 0.15)),
                                        request(first, shared_spans, 0.15), request(second, shared_spans, 0.15)],
                      chunked_prefill_size=CHUNKED_PREFILL)
    return stock["rag"], plugin


@pytest.fixture(scope="module")
def radix(model_dir, prompt, plain_prompts):
    """A plugin worker with its radix cache on: a plain request, the RAG request twice, the RAG request batched
    with a plain one sharing the system prompt, a plain prompt holding the RAG prompt's system prompt and first
    chunk (which enter the radix tree), the RAG request at ratio 1 (found there past its first chunk), the RAG
    prompt without chunks (which enters the radix tree), then the RAG request once more (now found there whole).
    The plugin times its passes (BLENDGATE_SGLANG_PROFILE)."""
    ids, spans = prompt
    return generate(model_dir, True, [request(plain_prompts["p1"]), request(ids, spans, 0.15),
                                      request(ids, spans, 0.15),
                                      batch(request(ids, spans, 0.15), request(plain_prompts["p2"])),
                                      request(ids[:spans[1]] + [5, 6, 7]), request(ids, spans, 1.0),
                                      request(ids), request(ids, spans, 0.15)],
                    profile=True, disable_radix_cache=False)


def assert_close(ours: dict[int, float], theirs: dict[int, float], atol: float) -> None:
    shared = [t for t in theirs if t in ours]
    assert len(shared) >= TOP // 2, (ours, theirs)
    worst = max(abs(ours[t] - theirs[t]) for t in shared)
    assert worst <= atol, f"log-probabilities differ by up to {worst:.4f}"


def test_plugin_at_ratio_one_matches_stock_sglang_and_decodes_over_its_pool(outputs) -> None:
    stock, (full, *_) = outputs
    report = full["meta_info"]["blendgate"][0]
    assert report["mode"] == "blend" and report["recompute_ratio"] == 1.0, report
    assert_close(top_logprobs(full), top_logprobs(stock), atol=BF16_LOGITS)
    # Decoding reads the KV the plugin wrote into SGLang's pool: the same tokens and log-probabilities follow
    # (compared while both pick the same tokens; bf16 near-ties may part them later).
    for step, (ours, theirs) in enumerate(zip(full["output_ids"], stock["output_ids"])):
        assert_close(top_logprobs(full, step), top_logprobs(stock, step), atol=BF16_LOGITS)
        if ours != theirs:
            break
    assert full["output_ids"][:2] == stock["output_ids"][:2]


def test_plugin_blend_matches_the_local_engine(outputs, model_dir, prompt) -> None:
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import ChunkBlender
    from blendgate.chunkcache.tiers import MemoryTier
    from blendgate.engine.llama import LlamaFamilyModel
    from blendgate.sglang_plugin.protocol import prompt_of
    from safetensors.torch import load_file
    from transformers import AutoConfig

    _, (_, blended, *_) = outputs
    ids, spans = prompt
    config = AutoConfig.from_pretrained(model_dir)
    weights = {name: t.cuda() for name, t in load_file(str(model_dir / "model.safetensors")).items()}
    model = LlamaFamilyModel(config, weights, device=torch.device("cuda"), dtype=torch.bfloat16)
    blender = ChunkBlender(model, ChunkCacheStore([MemoryTier("gpu", 1 << 30, "cuda")]))
    custom = {"blendgate_chunk_spans": spans, "blendgate_prefill_mode": "blend", "blendgate_recompute_ratio": 0.15}
    with torch.inference_mode():
        result, local = blender.blend(prompt_of(ids, custom))
    local_report = local.as_dict()
    local = torch.log_softmax(result.logits.float(), dim=-1)
    report = blended["meta_info"]["blendgate"][0]
    assert report["mode"] == "blend"
    assert report["recomputed_tokens"] == local_report["recomputed_tokens"] < report["chunk_tokens"] == 256
    assert_close({t: float(local[t]) for t in top_logprobs(blended)}, top_logprobs(blended), atol=BF16_LOGITS)


def test_requests_without_chunks_are_stock_sglang(outputs) -> None:
    _, (_, _, plain, *_) = outputs
    assert "blendgate" not in plain["meta_info"]
    assert len(plain["output_ids"]) == 6


def test_a_mixed_batch_blends_the_blending_request_and_gives_the_others_stock_sglangs_logits(outputs, stock) -> None:
    _, (_, _, _, mixed, *_) = outputs
    blended, short, long = mixed
    report = blended["meta_info"]["blendgate"][0]
    assert report["mode"] == "blend" and report["recompute_ratio"] < 1.0 and report["hit_count"] == 4, report
    # The short plain request: computed by the plugin in the same pass; the long one: its first piece by the
    # plugin (chunked prefill), the rest by SGLang over the KV the plugin wrote. Neither asked for a report.
    for name, output in (("short", short), ("long", long)):
        assert report_of(output["meta_info"]) == {}, output["meta_info"]
        assert_close(top_logprobs(output), top_logprobs(stock[name]), atol=BF16_LOGITS)
        assert output["output_ids"][:2] == stock[name]["output_ids"][:2]


def test_two_blending_requests_in_one_pass_give_what_each_gives_alone(outputs) -> None:
    _, (*_, batched, first_alone, second_alone) = outputs
    for together, alone in zip(batched, (first_alone, second_alone)):
        report, alone_report = report_of(together["meta_info"]), report_of(alone["meta_info"])
        assert report["mode"] == alone_report["mode"] == "blend", (report, alone_report)
        # Batched, the new chunk was a miss for both (computed once in the pass); alone after, a hit.
        assert report["hit_count"] == 2 and alone_report["hit_count"] == 3, (report, alone_report)
        assert_close(top_logprobs(together), top_logprobs(alone), atol=BF16_LOGITS)
        assert together["output_ids"][:2] == alone["output_ids"][:2]


def test_with_the_radix_cache_on_blended_kv_is_never_a_prefix_and_plain_requests_keep_theirs(radix, stock,
                                                                                         prompt) -> None:
    head = prompt[1][1]  # the end of the RAG prompt's first chunk
    first_plain, first, second, (third, batched_plain), _, after_head, unchunked, exact = radix
    for output in (first, second, third):
        report = output["meta_info"]["blendgate"][0]
        assert report["mode"] == "blend" and report["recompute_ratio"] < 1.0, report
        # At most the system prompt (from the first plain request) comes from the radix cache: no blended token.
        assert output["meta_info"]["cached_tokens"] <= SYSTEM, output["meta_info"]
    assert second["meta_info"]["blendgate"][0]["hit_count"] == 4
    # The same request blended twice (chunk KV computed, then read from the store) gives the same answer.
    assert_close(top_logprobs(second), top_logprobs(first), atol=BF16_LOGITS)
    assert second["output_ids"][:2] == first["output_ids"][:2]
    # Plain requests sharing the system prompt get it from the radix cache, also when the plugin prefills them
    # beside a blending request (their cached prefix read from SGLang's pool), with stock SGLang's answer.
    assert batched_plain["meta_info"]["cached_tokens"] >= SYSTEM, batched_plain["meta_info"]
    assert report_of(batched_plain["meta_info"]) == {}
    for name, output in (("p1", first_plain), ("p2", batched_plain)):
        assert_close(top_logprobs(output), top_logprobs(stock[name]), atol=BF16_LOGITS)
        assert output["output_ids"][:2] == stock[name]["output_ids"][:2]
    # Found in the tree past its first chunk (a plain prompt held the system prompt and that chunk): the blend
    # starts from that exact KV, read from SGLang's pool, and blends the chunks after it; at ratio 1, stock's.
    report = report_of(after_head["meta_info"])
    assert report["mode"] == "blend" and report["prefix_tokens_reused"] == head, report
    assert report["recompute_ratio"] == 1.0 and len(report["hits"]) == 3, report
    assert after_head["meta_info"]["cached_tokens"] == head, after_head["meta_info"]
    assert_close(top_logprobs(after_head), top_logprobs(stock["rag"]), atol=BF16_LOGITS)
    # The RAG prompt's tokens without chunks after four blends of it: what the plain prompts put in the tree.
    assert unchunked["meta_info"]["cached_tokens"] <= head, unchunked["meta_info"]
    assert_close(top_logprobs(unchunked), top_logprobs(stock["rag"]), atol=BF16_LOGITS)
    # Its exact KV is in the tree now: the RAG request found there with all its chunks is computed exactly
    # after them (nothing left to blend), says why, and answers as stock SGLang.
    report = report_of(exact["meta_info"])
    assert report["mode"] == "full_prefill" and "all its chunks" in report["fallback"], report
    assert exact["meta_info"]["cached_tokens"] > SYSTEM
    assert_close(top_logprobs(exact), top_logprobs(stock["rag"]), atol=BF16_LOGITS)


def test_a_profiled_pass_reports_its_stages(radix, outputs) -> None:
    from blendgate.sglang_plugin.profile import PROFILE_KEY, TIERS_KEY

    _, first, _, (third, batched_plain), *_ = radix
    for output in (first, third):  # alone, and in a pass with a plain request
        timings = output["meta_info"]["blendgate"][0][PROFILE_KEY]
        tiers = output["meta_info"]["blendgate"][0][TIERS_KEY]  # what the chunk-cache held after the pass
        assert [tier["name"] for tier in tiers] == ["gpu", "cpu"] and tiers[0]["entries"] >= 1, tiers
        assert set(timings) == {"requests", "plan", "prefill", "kv_write", "logits", "gpu", "hook_wall",
                                "misses", "pinned_alloc"}, timings
        assert all(value > 0 for stage, value in timings.items() if stage not in ("misses", "pinned_alloc")), timings
        assert timings["pinned_alloc"] >= 0, timings
        assert 0 <= timings["misses"] <= timings["prefill"], timings  # uncached chunks: a part of the prefill
        assert timings["requests"] == (1 if output is first else 2)
        assert timings["prefill"] + timings["kv_write"] + timings["logits"] <= timings["gpu"] * 1.01 + 0.05
        assert timings["hook_wall"] >= timings["plan"]
    assert report_of(batched_plain["meta_info"]) == {}  # a request that asked no blend gets no report
    _, (_, blended, *_) = outputs  # a worker without profiling reports no timings
    assert PROFILE_KEY not in blended["meta_info"]["blendgate"][0]
