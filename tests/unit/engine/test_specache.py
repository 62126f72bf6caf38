"""SpeCache's decode step (engine/specache.py over engine/kv_offload.py) on SmolLM2's real weights (CPU,
float32, greedy): with a budget that holds the whole context it gives the full-KV decode's tokens, directly and
after a blended prefill; with a small budget it still gives full KV's first tokens on an easy prompt, the
budget's top-k slots hold exactly the host's pairs of the positions the residency table names, and the
prefetch hit rate is counted; with the eightfold settings (1-bit keys in groups of 64), a group completed in
decode is quantised from the recent window as the host's keys would be, and the request's GPU bytes are what
the policy counts; the steady step's device work (what a CUDA graph captures, engine/specache_graph.py, run
eagerly here) gives the eager step's logits, residency, counts, host tier and low-bit keys."""

from __future__ import annotations

import pytest
import torch
from blendgate.engine.kv_pool import BlockAllocator, KVPoolError
from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.engine.runner import LlamaRunner
from blendgate.engine.specache import SpeCacheDecoder, top_k_with_one_more
from blendgate.engine.specache_graph import SteadyStepGraphs
from blendgate.engine.specache_policy import KVShape, SpeCacheSettings, gpu_kv_bytes
from blendgate.kernels.lowbit_keys import quantize_reference

TEXT = ("The history of the city begins with a small fishing village on the river. Over the centuries merchants "
        "arrived, built warehouses and a stone bridge, and the village grew into a market town. ")
QUESTION = "In short, the village grew into a"


@pytest.fixture(scope="module")
def runner(loaded_model) -> LlamaRunner:
    return LlamaRunner(loaded_model)


def ids(loaded_model, text: str) -> list[int]:
    return loaded_model.tokenizer(text, add_special_tokens=False)["input_ids"]


def full_kv(runner, prompt: Prompt, tokens: int) -> list[int]:
    with torch.inference_mode():
        logits, state = runner.prefill(prompt)
        out = [int(logits.argmax())]
        while len(out) < tokens:
            out.append(int(runner.decode(out[-1], state).argmax()))
    return out


def specache(runner, prompts: list[Prompt], tokens: int, settings: SpeCacheSettings,
             check=None) -> tuple[list[list[int]], SpeCacheDecoder]:
    """Greedy tokens of the prompts decoded together as one SpeCache batch."""
    allocator = BlockAllocator(num_blocks=64, rows=len(prompts))
    pool = runner.batch_decoder(allocator.num_blocks, allocator.rows, 1024).pool
    decoder = SpeCacheDecoder(runner.model, pool, settings)
    out = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            logits, state = runner.prefill(prompt)
            allocation = allocator.allocate(i, settings.budget(len(prompt)).tokens)
            decoder.admit(i, allocation, state.cache, tokens)
            out.append([int(logits.argmax())])
        for _ in range(tokens - 1):
            batch = decoder.batch(list(range(len(prompts))), [o[-1] for o in out])
            for o, token in zip(out, decoder.decode(batch).argmax(dim=-1).tolist()):
                o.append(token)
            if check is not None:
                check(decoder)
    return out, decoder


def test_a_budget_of_the_whole_context_gives_full_kv_tokens(runner, loaded_model) -> None:
    prompts = [Prompt.plain(ids(loaded_model, TEXT * 2 + QUESTION)), Prompt.plain(ids(loaded_model, QUESTION))]
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=256)
    assert len(prompts[0]) > 4 + 64  # the top-k slots are used: candidates between the sinks and the window
    got, decoder = specache(runner, prompts, 5, settings)
    for prompt, tokens in zip(prompts, got):
        assert tokens == full_kv(runner, prompt, 5)
    # Every step but the first found its candidates (all of them: the budget holds the context) prefetched.
    stats, model = decoder.requests[0].stats, runner.model
    assert stats.wanted - stats.hits == model.num_layers * model.kv_heads * (len(prompts[0]) + 1 - 64 - 4)


def test_a_blended_prefill_hands_its_kv_to_specache(loaded_model) -> None:
    from blendgate.chunkcache.fallback import PrefillCosts
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier

    blending = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]),
                              costs=PrefillCosts(pass_tokens=0, placement_tokens=0))
    segments = [PromptSegment(tuple(ids(loaded_model, "<|im_start|>system\nAnswer from the documents.<|im_end|>\n"
                                                      "<|im_start|>user\nDocuments:\n\n")))]
    for document in [TEXT, "The blue castle's secret code is 4711."]:
        segments.append(PromptSegment(tuple(ids(loaded_model, document + "\n\n")), is_chunk=True))
    segments.append(PromptSegment(tuple(ids(loaded_model, "Question: What is the code?<|im_end|>\n"
                                                          "<|im_start|>assistant\n"))))
    prompt = Prompt(segments, mode="blend", recompute_ratio=0.3)
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=512)
    assert len(prompt) > 4 + 64
    got, _ = specache(blending, [prompt], 4, settings)
    assert got[0] == full_kv(blending, prompt, 4)


@pytest.mark.parametrize("share", [1.0, 0.25])
def test_a_small_budget_decodes_from_the_best_pairs(runner, loaded_model, share) -> None:
    """With a share under 1 a step selects a quarter of the top-k slots and reads all of them: the slots it
    did not select still hold exact pairs (those admitted, or selected by earlier steps)."""
    prompt = Prompt.plain(ids(loaded_model, TEXT * 4 + QUESTION))
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=100, bits=2,
                                selected_share=share)
    assert settings.budget(len(prompt)).select(len(prompt) + 1).scored  # the top-k is chosen from the start

    def resident_pairs_are_the_hosts(decoder: SpeCacheDecoder) -> None:
        request = decoder.requests[0]
        base = request.budget.sink_tokens + request.budget.recent_tokens
        for layer in (0, runner.model.num_layers - 1):
            resident = request.resident[layer]
            assert bool((resident >= 0).all())  # the top-k slots are all in use
            heads = torch.arange(resident.shape[0])[:, None].expand_as(resident)
            slots = request.slots[base + torch.arange(resident.shape[1])].expand_as(resident)
            assert torch.equal(decoder.pool.keys[layer][heads, slots], request.host.keys[layer][heads, resident])
            assert torch.equal(decoder.pool.values[layer][heads, slots], request.host.values[layer][heads, resident])

    got, decoder = specache(runner, [prompt], 4, settings, check=resident_pairs_are_the_hosts)
    assert got[0][:2] == full_kv(runner, prompt, 2)
    request, model = decoder.requests[0], runner.model
    assert 0 < request.stats.hit_rate <= 1 and request.stats.copied > 0
    steps = 3 * model.num_layers * model.kv_heads
    assert request.stats.wanted == steps * request.budget.selected
    assert request.budget.selected == (request.budget.top_k if share == 1 else -(-request.budget.top_k // 4))
    # A step copies at most what it selects; its prefetch at most as much again.
    assert request.stats.copied <= 2 * steps * request.budget.selected
    assert request.gpu_bytes(runner.kv_token_bytes) < len(prompt) * runner.kv_token_bytes


def test_a_speculating_step_reads_what_the_last_steps_guess_chose(runner, loaded_model) -> None:
    """SpeCacheSettings.speculate: each step also decodes a guess of the next token, whose queries choose the
    next step's pairs (prefetched); a step whose token is the last step's guess does not select on its own
    (its top-k slots hold the guess's choice, exact host pairs), any other step selects as without speculation.
    The guess's pair lives in the budget's scratch slot, never in the slots the real rows read."""
    prompt = Prompt.plain(ids(loaded_model, TEXT * 4 + QUESTION))
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=100, bits=2, speculate=True)
    budget = settings.budget(len(prompt))
    assert budget.scratch == 1 and budget.tokens == 101 and budget.top_k == 100 - 4 - 64
    seen = []

    def resident_pairs_are_the_hosts(decoder: SpeCacheDecoder) -> None:
        request = decoder.requests[0]
        seen.append((request.guessed, request.confirmed, request.stats.wanted))
        assert decoder.guess(0) is not None and decoder.speculated(0) == request.speculated is not None
        for layer in (0, runner.model.num_layers - 1):
            resident = request.resident[layer]
            heads = torch.arange(resident.shape[0])[:, None].expand_as(resident)
            slots = request.slots[budget.top_k_slots][None].expand_as(resident)
            assert torch.equal(decoder.pool.keys[layer][heads, slots], request.host.keys[layer][heads, resident])

    got, decoder = specache(runner, [prompt], 12, settings, check=resident_pairs_are_the_hosts)
    assert got[0][:2] == full_kv(runner, prompt, 2)  # the first step has no guess: it selects on its own
    model = runner.model
    per_step = model.num_layers * model.kv_heads * budget.selected
    guessed, confirmed, wanted = seen[-1]
    assert guessed == 10 and 0 < confirmed <= guessed  # every step but the first had the last one's guess
    assert wanted == (1 + guessed - confirmed) * per_step  # only steps whose guess failed selected on their own
    for (_, c0, w0), (_, c1, w1) in zip(seen, seen[1:]):
        assert (w1 - w0) == (0 if c1 > c0 else per_step)


def test_speculation_needs_no_guess_while_the_context_fits_the_budget(runner, loaded_model) -> None:
    prompt = Prompt.plain(ids(loaded_model, TEXT * 2 + QUESTION))
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=256, speculate=True)
    got, decoder = specache(runner, [prompt], 5, settings)
    assert got[0] == full_kv(runner, prompt, 5) and decoder.requests[0].guessed == 0
    with pytest.raises(ValueError, match="select_every"):
        SpeCacheSettings(speculate=True, select_every=2)


def test_eightfold_settings_quantise_decoded_groups_from_the_window(runner, loaded_model) -> None:
    settings = SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, gpu_budget_tokens=200)
    prompt = Prompt.plain(ids(loaded_model, TEXT * 9)[: 5 * 64 - 2])  # the second step completes a group
    assert len(prompt) == 5 * 64 - 2
    assert settings.budget(len(prompt)).select(len(prompt) + 1).scored
    got, decoder = specache(runner, [prompt], 4, settings)
    assert got[0][:2] == full_kv(runner, prompt, 2)
    request, model = decoder.requests[0], runner.model
    assert request.lowbit.length == 5 * 64
    for layer in (0, model.num_layers - 1):
        expected = quantize_reference(request.host.keys[layer, :, 4 * 64: 5 * 64], bits=1, group=64)
        assert torch.equal(request.lowbit.codes[layer, :, 4 * 64: 5 * 64], expected.codes)
        assert torch.equal(request.lowbit.zeros[layer, :, 4], expected.zeros[:, 0])
    shape = KVShape(model.num_layers, model.kv_heads, model.head_dim, model.dtype.itemsize)
    counted = gpu_kv_bytes(settings, len(prompt), shape, new_tokens=4)
    assert request.gpu_bytes(shape.pair_bytes) == counted.total
    assert counted.total < counted.full


@pytest.mark.parametrize("share, every, speculate", [(1.0, 1, False), (0.25, 1, False), (1.0, 3, False),
                                                     (1.0, 1, True)])
def test_the_steady_steps_device_work_equals_the_eager_step(runner, loaded_model, share, every,
                                                            speculate) -> None:
    settings = SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, gpu_budget_tokens=200,
                                          selected_share=share, select_every=every, speculate=speculate)
    prompt = Prompt.plain(ids(loaded_model, TEXT * 9)[: 5 * 64 - 2])  # the second step completes a group
    decoders = []
    with torch.inference_mode():
        logits, state = runner.prefill(prompt)
        for steady in (False, True):
            allocator = BlockAllocator(num_blocks=64, rows=1)
            pool = runner.batch_decoder(allocator.num_blocks, allocator.rows, 1024).pool
            decoder = SpeCacheDecoder(runner.model, pool, settings, graphs=False)
            if steady:  # on the CPU, the steady step's work without capturing it
                decoder.graphs = SteadyStepGraphs(runner.model.device)
            decoder.admit(0, allocator.allocate(0, settings.budget(len(prompt)).tokens), state.cache, 8)
            decoders.append(decoder)
        token = int(logits.argmax())
        for _ in range(6):
            eager, steady = [d.decode(d.batch([0], [token])) for d in decoders]
            torch.testing.assert_close(steady, eager, atol=1e-5, rtol=1e-5)
            token = int(eager.argmax())
    eager, steady = (d.requests[0] for d in decoders)
    assert torch.equal(steady.resident, eager.resident) and steady.stats == eager.stats
    assert (steady.guessed, steady.confirmed) == (eager.guessed, eager.confirmed)
    assert steady.guessed == (5 if speculate else 0)  # the first step kicks the guesses off (eagerly)
    assert steady.length == eager.length == len(prompt) + 6 and steady.lowbit.length == eager.lowbit.length
    assert torch.equal(steady.host.keys[:, :, : steady.length], eager.host.keys[:, :, : eager.length])
    assert torch.equal(steady.lowbit.codes, eager.lowbit.codes)


def test_steps_between_selections_read_the_slots_as_they_are(runner, loaded_model) -> None:
    """select_every 3: the first step and every third after it select (score, copy, prefetch); the steps between
    neither want nor copy pairs, and leave the residency table and the slots as they were."""
    prompt = Prompt.plain(ids(loaded_model, TEXT * 4 + QUESTION))
    settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=100, bits=2, select_every=3)
    seen = []

    def record(decoder: SpeCacheDecoder) -> None:
        request = decoder.requests[0]
        seen.append((request.since_selecting, request.stats, request.resident.clone(),
                     decoder.pool.keys[:, :, request.slots].clone()))

    got, decoder = specache(runner, [prompt], 8, settings, check=record)
    assert got[0][:2] == full_kv(runner, prompt, 2)  # the first step selects
    assert [since for since, *_ in seen] == [0, 1, 2, 0, 1, 2, 0]
    model, budget = runner.model, decoder.requests[0].budget
    per_step = model.num_layers * model.kv_heads * budget.selected
    assert [s.wanted for _, s, *_ in seen] == [per_step, per_step, per_step, 2 * per_step, 2 * per_step,
                                               2 * per_step, 3 * per_step]
    for (since, before, resident, _), (_, after, resident_after, _) in zip(seen, seen[1:]):
        if since == 0:  # the next step reads: nothing copied, nothing moved
            assert after.copied == before.copied and torch.equal(resident_after, resident)


def test_a_batch_selects_when_one_of_its_requests_must() -> None:
    from blendgate.engine.specache_policy import selects

    assert selects([None], 4) and selects([0, None], 4)  # a request's first scored step
    assert not selects([0, 1, 2], 4) and selects([0, 3], 4)
    assert selects([5], 1) and selects([], 1) is False
    with pytest.raises(ValueError):
        selects([0], 0)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_the_next_steps_top_k_is_this_steps_grown_by_one_position(as_tensor) -> None:
    """One top-k a layer instead of two: the prefetch's prediction (candidates up to and including `position`)
    from this step's top-k (candidates before it) and the one new score, the same set as a second top-k."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        scores = torch.randn(4, 300, generator=generator)  # distinct scores: no ties
        position, k = 100 + trial, 16 + trial % 7
        scores[:, 5 * (trial % 3)] = float("-inf")  # a sink, masked as the decoder masks them
        top = scores[:, :position].topk(k, dim=1)
        grown = top_k_with_one_more(top.values, top.indices, scores,
                                    torch.tensor(position) if as_tensor else position)
        expected = scores[:, : position + 1].topk(k, dim=1).indices
        assert grown.shape == (4, k)
        for head in range(4):
            assert set(grown[head].tolist()) == set(expected[head].tolist())
    # A new position scoring below every kept one changes nothing; above, it replaces the lowest.
    scores = torch.tensor([[5.0, 4.0, 3.0, 1.0], [5.0, 4.0, 3.0, 9.0]])
    top = scores[:, :3].topk(2, dim=1)
    assert top_k_with_one_more(top.values, top.indices, scores, 3).tolist() == [[0, 1], [0, 3]]


def test_an_allocation_smaller_than_the_budget_is_refused(runner, loaded_model) -> None:
    allocator = BlockAllocator(num_blocks=8, rows=1)
    pool = runner.batch_decoder(allocator.num_blocks, allocator.rows, 128).pool
    decoder = SpeCacheDecoder(runner.model, pool, SpeCacheSettings(enabled=True, gpu_budget_tokens=100))
    _, state = runner.prefill(Prompt.plain(ids(loaded_model, TEXT)))
    with pytest.raises(KVPoolError, match="does not fit"):
        decoder.admit(0, allocator.allocate(0, 16), state.cache, 4)


def test_the_engine_decodes_long_prompts_with_specache_beside_short_ones(runner, loaded_model) -> None:
    """A prompt over min_context_tokens reserves its budget (not its context) and decodes in SpeCache's step,
    while a short one decodes in the batched step; with a budget of the whole context both get full KV's
    tokens."""
    import asyncio

    from blendgate.engine.engine import LocalEngine
    from blendgate.engine.sampling import SamplingParams

    long, short = ids(loaded_model, TEXT * 2 + QUESTION), ids(loaded_model, QUESTION)
    settings = SpeCacheSettings(enabled=True, min_context_tokens=len(short) + 1, gpu_budget_tokens=200)
    engine = LocalEngine(runner, max_context_tokens=256, stop_token_ids=frozenset(), max_running=2,
                         specache=settings)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)

    async def main() -> list[list[int]]:
        handles = [engine.submit(prompt, params) for prompt in (long, short)]
        assert [h.kv_tokens for h in handles] == [200, len(short) + 4]
        tokens = []
        for handle in handles:  # both run together; the second's tokens wait in its queue
            tokens.append([event.token_id async for event in handle])
        return tokens

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert got == [full_kv(runner, Prompt.plain(long), 4), full_kv(runner, Prompt.plain(short), 4)]
    assert not engine._specache.requests  # released when they finished


def test_the_engine_serves_a_speculating_request(runner, loaded_model) -> None:
    """With `speculate` a request reserves its budget and the guess's scratch slot, decodes through the
    engine's loop with its guesses, and is released when it finishes."""
    import asyncio

    from blendgate.engine.engine import LocalEngine
    from blendgate.engine.sampling import SamplingParams

    long = ids(loaded_model, TEXT * 4 + QUESTION)
    settings = SpeCacheSettings(enabled=True, min_context_tokens=64, gpu_budget_tokens=100, bits=2, speculate=True)
    assert settings.budget(len(long)).select(len(long) + 1).scored
    engine = LocalEngine(runner, max_context_tokens=256, stop_token_ids=frozenset(), max_running=2,
                         specache=settings)

    async def main() -> list[int]:
        handle = engine.submit(long, SamplingParams(max_new_tokens=6, temperature=0.0))
        assert handle.kv_tokens == 101  # 100 pairs and the guess's slot
        return [event.token_id async for event in handle]

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(got) == 6 and got[:2] == full_kv(runner, Prompt.plain(long), 2)
    assert not engine._specache.requests
