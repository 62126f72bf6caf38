"""The blending runner on the real SmolLM2: modes agree where they must, chunk KV is cached and reused."""

from __future__ import annotations

import time

import pytest
import torch
from blendgate.chunkcache.fallback import (
    MAX_MEASURED_PASS_TOKENS,
    PrefillCalibration,
    PrefillCosts,
    PrefillTiming,
    blend_fallback,
)
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.runner import BlendingRunner
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.chunkcache.warming import WarmPacer
from blendgate.engine.prompt import Prompt, PromptSegment

DOCUMENTS = ["The blue castle stands on a granite hill. Its secret code is 4711.\n\n",
             "The Silverrun river flows north for 312 kilometres.\n\n",
             "The corner bakery sells rye bread on Tuesdays.\n\n"]


# These documents are a few tokens each, which blending does not pay for (see the fallback tests at the end):
# no per-chunk cost, so the runner blends them and the tests exercise blending.
BLEND_ALWAYS = PrefillCosts(pass_tokens=0, placement_tokens=0)
# A pass's fixed cost above what eight tiny documents save (0.85 x ~70 tokens): their cold prompt is prefilled
# in full, where the CPU default (24 tokens, one pass for all their misses) blends it.
SLOW_PASSES = PrefillCosts(pass_tokens=200, placement_tokens=1)


@pytest.fixture()
def runner(loaded_model) -> BlendingRunner:
    return BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=BLEND_ALWAYS)


def rag_prompt(tokenizer, documents: list[str], mode: str, ratio: float = 0.15) -> Prompt:
    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    segments = [PromptSegment(encode("<|im_start|>system\nAnswer from the documents.<|im_end|>\n"
                                     "<|im_start|>user\nDocuments:\n\n"))]
    for i, document in enumerate(documents, start=1):
        segments += [PromptSegment(encode(f"[{i}] ")), PromptSegment(encode(document), is_chunk=True)]
    segments.append(PromptSegment(encode("Question: What is the secret code?<|im_end|>\n<|im_start|>assistant\n")))
    return Prompt(segments, mode=mode, recompute_ratio=ratio)


def test_modes_that_must_equal_full_prefill_do(runner, tokenizer) -> None:
    with torch.inference_mode():
        full, _ = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "full_prefill"))
        for _ in range(2):  # the second time the prefixes come from the prefix cache
            prefix, state = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "prefix"))
            torch.testing.assert_close(prefix, full, atol=1e-3, rtol=1e-4)
        assert state.report.prefix_tokens_reused > 20
        blended, state = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend", ratio=1.0))
    torch.testing.assert_close(blended, full, atol=1e-3, rtol=1e-4)
    assert state.report.recompute_ratio == 1.0


def test_chunk_kv_is_cached_and_reused_in_any_order(runner, tokenizer) -> None:
    with torch.inference_mode():
        _, first = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend"))
        _, reordered = runner.prefill(rag_prompt(tokenizer, DOCUMENTS[::-1], "blend"))
        _, reused = runner.prefill(rag_prompt(tokenizer, DOCUMENTS[1:], "reuse"))
    assert first.report.hits == [False, False, False]
    assert reordered.report.hits == [True, True, True]
    assert reused.report.hits == [True, True] and reused.report.recompute_ratio == 0.0
    assert 0.1 < first.report.recompute_ratio <= 0.2
    # Three chunks and the system prompt, whose exact KV is reused too.
    assert runner.store.report()["tiers"][0]["entries"] == 4
    assert first.report.prefix_tokens_reused > 0
    # The default rule measures each chunk's drift when blending and records it in the chunk's entry.
    assert sum(entry["sensitivity"] is not None for entry in runner.store.entries()) == 3


def test_decoding_continues_from_a_blended_prefill(runner, tokenizer) -> None:
    with torch.inference_mode():
        logits, state = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend", ratio=1.0))
        tokens = []
        for _ in range(16):
            token = int(torch.argmax(logits))
            tokens.append(token)
            logits = runner.decode(token, state)
        full_logits, full_state = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "full_prefill"))
        expected = []
        for _ in range(16):
            token = int(torch.argmax(full_logits))
            expected.append(token)
            full_logits = runner.decode(token, full_state)
    assert tokens == expected
    assert "4711" in tokenizer.decode(tokens)


def test_chunks_computed_alone_are_cached_apart_from_those_after_the_system_prompt(loaded_model, tokenizer) -> None:
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")])
    with torch.inference_mode():
        BlendingRunner(loaded_model, store, chunk_prefix="system", costs=BLEND_ALWAYS).prefill(
            rag_prompt(tokenizer, DOCUMENTS, "reuse"))
        _, alone = BlendingRunner(loaded_model, store, chunk_prefix="none", costs=BLEND_ALWAYS).prefill(
            rag_prompt(tokenizer, DOCUMENTS, "reuse"))
    assert alone.report.hits == [False, False, False]  # other keys: computed without the prefix
    assert len(store.tiers[0].entries) == 7  # 3 chunks each way, and the system prompt's own KV, shared


# -- blend or full prefill ----------------------------------------------------------------------------------------


def test_the_rule_weighs_per_chunk_work_against_the_tokens_blending_saves() -> None:
    costs = PrefillCosts(pass_tokens=24, placement_tokens=1)
    # Four retrieval-sized chunks, none cached: 4 passes (96) against 0.85 * 1024 = 870 tokens saved.
    assert blend_fallback([256] * 4, [False] * 4, 0.15, costs) is None
    # The 700 five-token documents, none cached: 16,800 against 2,975.
    reason = blend_fallback([5] * 700, [False] * 700, 0.15, costs)
    assert reason == ("blending 700 chunks (700 not cached) would cost about 16800 tokens of per-chunk work to "
                      "save 2975: slower than a full prefill")
    # Cached, they cost a placement each (700) and blending pays.
    assert blend_fallback([5] * 700, [True] * 700, 0.15, costs) is None
    # At the edge: 10 uncached 20-token chunks cost 240 and save 200 at r = 0, 170 at r = 0.15.
    assert blend_fallback([20] * 10, [False] * 10, 0.0, costs) is not None
    assert blend_fallback([20] * 10, [False] * 9 + [True], 0.0, PrefillCosts(20, 0)) is None  # 180 <= 200
    assert blend_fallback([], [], 0.15, costs) is None
    with pytest.raises(ValueError):
        blend_fallback([5, 5], [True], 0.15, costs)


def test_uncached_chunks_computed_side_by_side_pay_one_pass() -> None:
    from blendgate.chunkcache.runner import chunk_passes

    costs = PrefillCosts(pass_tokens=2150, placement_tokens=1)  # an 8B model's pass inside SGLang (H200)
    # Eight 512-token chunks, two not cached: one pass each (4,300 + 6) outweighs the 3,481 saved; both in one
    # pass (2,150 + 6) do not.
    assert "2 not cached) would cost about 4306" in blend_fallback([512] * 8, [False] * 2 + [True] * 6, 0.15, costs)
    assert blend_fallback([512] * 8, [False] * 2 + [True] * 6, 0.15, costs, passes=1) is None
    reason = blend_fallback([512] * 2, [False] * 2, 0.15, costs, passes=1)
    assert reason.startswith("blending 2 chunks (2 not cached in 1 pass) would cost about 2150 tokens")
    assert blend_fallback([512] * 8, [True] * 8, 0.15, costs, passes=1) is None  # no miss: no pass
    # A pass a distinct prefix, more where a prefix's chunks (padded to their longest) exceed a pass's tokens.
    system, other = (1, 2), (1, 3)
    assert chunk_passes([]) == 0
    assert chunk_passes([(system, (5,) * 512)] * 8) == 1
    assert chunk_passes([(system, (5,) * 512)] * 8 + [(other, (6,) * 10)]) == 2
    assert chunk_passes([(system, (5,) * 512)] * 17) == 2 and chunk_passes([(system, (5,) * 8193)]) == 1


def test_fetching_from_the_shared_tier_counts_against_blending() -> None:
    costs = PrefillCosts(pass_tokens=4096, placement_tokens=1)
    # Five 150-token passages read from Redis: each fetch is cheaper than a pass of its own (4,096 tokens), but
    # 5 x 640 tokens of fetching outweigh the 638 a blend saves over a full prefill of the prompt.
    reason = blend_fallback([150] * 5, [True] * 5, 0.15, costs, fetch_tokens=[640.0] * 5)
    assert reason == ("blending 5 chunks (0 not cached) would cost about 3205 tokens of per-chunk work, 3200 of "
                      "them fetching from the shared tier, to save 638: slower than a full prefill")
    # In a local tier they cost a placement each, and blending pays.
    assert blend_fallback([150] * 5, [True] * 5, 0.15, costs, fetch_tokens=[0.0] * 5) is None
    # A long prompt's chunks are worth fetching: 8 x 512 tokens save 3,481 against 8 x 200 of fetching.
    assert blend_fallback([512] * 8, [True] * 8, 0.15, costs, fetch_tokens=[200.0] * 8) is None
    with pytest.raises(ValueError):
        blend_fallback([150] * 2, [True] * 2, 0.15, costs, fetch_tokens=[1.0])


def test_a_calibration_fits_a_pass_cost_and_a_rate_from_two_sizes() -> None:
    # 16 tokens in 10.5 ms, 256 in 22.5 ms: 50 us a token (20,000 tokens/s) and 9.7 ms a pass (194 tokens).
    fit = PrefillCalibration(PrefillTiming(16, 0.0105), PrefillTiming(256, 0.0225))
    assert fit.tokens_per_s == pytest.approx(20_000) and fit.pass_tokens == pytest.approx(194)
    # Decided with it, a GPU's launch-bound passes make five uncached 150-token chunks dearer than a full
    # prefill (5 x 194 > 0.85 x 750), where the CPU's default pass cost (24) blended them.
    assert blend_fallback([150] * 5, [False] * 5, 0.15, PrefillCosts(fit.pass_tokens, 1)) is not None
    assert blend_fallback([150] * 5, [False] * 5, 0.15, PrefillCosts()) is None
    assert blend_fallback([150] * 5, [True] * 5, 0.15, PrefillCosts(fit.pass_tokens, 1)) is None  # cached: blend
    # Noise: the larger size timed faster. The slope falls back to its mean cost a token; the pass cost stays
    # within [0, MAX_MEASURED_PASS_TOKENS].
    noisy = PrefillCalibration(PrefillTiming(16, 0.5), PrefillTiming(256, 0.01))
    assert noisy.tokens_per_s == pytest.approx(25_600) and noisy.pass_tokens == MAX_MEASURED_PASS_TOKENS
    assert PrefillCalibration(PrefillTiming(16, 0.001), PrefillTiming(256, 0.1)).pass_tokens == 0.0
    for small, large in (((256, 0.01), (16, 0.02)), ((16, 0.0), (256, 0.01)), ((0, 0.01), (256, 0.02))):
        with pytest.raises(ValueError, match="two chunk sizes"):
            PrefillCalibration(PrefillTiming(*small), PrefillTiming(*large))


def test_the_runner_measures_its_prefill_at_two_sizes(loaded_model) -> None:
    runner = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("memory", 1 << 30, "cpu")]))
    measured = runner.blender.measure_prefill(tokens=24, small=4, repeats=1)
    assert (measured.small.tokens, measured.large.tokens) == (4, 24)
    assert measured.large.seconds > 0 and measured.small.seconds > 0 and measured.tokens_per_s > 0
    assert not runner.store.tiers[0].entries  # nothing stored
    # "auto" on the CPU is the CPU's default; a configured cost is kept as configured.
    assert runner.blender.calibrate("auto", 1.0) == PrefillCosts()
    assert runner.blender.calibrate(7.0, 0.5) == PrefillCosts(7.0, 0.5)


def test_many_tiny_chunks_are_prefilled_in_full_without_computing_them(loaded_model, tokenizer) -> None:
    # Whether that is faster than blending them is the rule's measured premise (ChunkBlender.calibrate), not
    # timed here: a wall-clock comparison in a test fails on a busy CI machine.
    documents = [f"Fact {i} is {i * 7}.\n\n" for i in range(8)]
    prompt = rag_prompt(tokenizer, documents, "blend")
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")])
    deciding = BlendingRunner(loaded_model, store, costs=SLOW_PASSES)
    forced_runner = BlendingRunner(loaded_model, store, costs=BLEND_ALWAYS)
    with torch.inference_mode():
        full, _ = deciding.prefill(rag_prompt(tokenizer, documents, "full_prefill"))
        fallen_back, state = deciding.prefill(prompt)
        assert store.report()["tiers"][0]["entries"] == 0  # nothing computed for the cache
        _, forced = forced_runner.prefill(prompt)
    report = state.report.as_dict()
    assert report["mode"] == "full_prefill" and report["requested_mode"] == "blend"
    assert report["fallback"].startswith("blending 8 chunks (8 not cached in 1 pass) would cost about 200 tokens")
    torch.testing.assert_close(fallen_back, full, atol=1e-3, rtol=1e-4)
    assert forced.report.mode == "blend" and forced.report.miss_count == 8


def test_chunks_a_fallback_left_uncached_are_warmed_so_the_prompt_blends_next_time(loaded_model, tokenizer) -> None:
    # Without warming, a prompt prefilled in full because its chunks were not cached would leave them uncached
    # and be prefilled in full every time (seen on the H200: SGLang's plugin never blended a cold prompt).
    documents = [f"Fact {i} is {i * 7}.\n\n" for i in range(8)]
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")])
    deciding = BlendingRunner(loaded_model, store, costs=SLOW_PASSES)
    forced = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=BLEND_ALWAYS)
    prompt = rag_prompt(tokenizer, documents, "blend")
    with torch.inference_mode():
        _, state = deciding.prefill(prompt)
        assert state.report.mode == "full_prefill" and deciding.blender.pending_warm == 8
        assert state.report.hits == [False] * 8  # counted as misses by the chunk-cache series
        left = [deciding.warm_step(busy=False) for _ in range(2)]  # idle: unpaced, WARM_BATCH (4) a call
        assert left == [True, False]
        assert store.report()["tiers"][0]["entries"] == 8 and deciding.blender.pending_warm == 0
        logits, state = deciding.prefill(prompt)
        expected, _ = forced.prefill(prompt)
    assert state.report.mode == "blend" and state.report.hit_count == 8
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)  # the KV a blend computes on a miss


def test_the_engine_warms_between_requests(loaded_model, tokenizer) -> None:
    import asyncio

    from blendgate.engine.engine import LocalEngine
    from blendgate.engine.sampling import SamplingParams

    runner = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=SLOW_PASSES)
    engine = LocalEngine(runner, max_context_tokens=512, stop_token_ids=frozenset(), max_running=2)
    prompt = rag_prompt(tokenizer, [f"Fact {i} is {i * 7}.\n\n" for i in range(8)], "blend")

    async def ask() -> str | None:
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=2, temperature=0.0))
        [_ async for _ in handle]
        return handle.prefill_report

    try:
        first = asyncio.run(ask())
        deadline = time.monotonic() + 60
        while runner.blender.pending_warm and time.monotonic() < deadline:  # the idle engine warms on its own
            time.sleep(0.05)
        second = asyncio.run(ask())
    finally:
        engine.shutdown()
    assert first.mode == "full_prefill" and first.fallback
    assert second.mode == "blend" and second.hit_count == 8, second


def test_under_load_warming_is_paced_to_its_share_of_the_time(loaded_model, tokenizer) -> None:
    now = [100.0]
    runner = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=SLOW_PASSES)
    runner.blender.warm_pacer = WarmPacer(0.25, clock=lambda: now[0])
    with torch.inference_mode():
        runner.prefill(rag_prompt(tokenizer, [f"Fact {i} is {i * 7}.\n\n" for i in range(8)], "blend"))
        assert runner.warm_step(busy=True) and runner.blender.pending_warm == 4  # the first is due at once
        next_at = runner.blender.warm_pacer._next_at
        assert next_at > now[0]  # 3x the warm's time later (share 0.25)
        assert runner.warm_step(busy=True) and runner.blender.pending_warm == 4  # not due yet: nothing done
        now[0] = next_at
        assert not runner.warm_step(busy=True) and runner.blender.pending_warm == 0


def test_the_pacer_spaces_warms_by_their_share() -> None:
    now = [0.0]
    pacer = WarmPacer(0.1, clock=lambda: now[0])
    assert pacer.due()
    pacer.spent(0.05)  # a 50 ms warm: the next 0.45 s later
    now[0] = 0.44
    assert not pacer.due()
    now[0] = 0.45
    assert pacer.due()
    assert WarmPacer(1.0).due()
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            WarmPacer(share)
