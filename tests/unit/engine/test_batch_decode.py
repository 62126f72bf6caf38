"""The batched decode (engine/decode.py over engine/paged_kv.py) against the one-request decode it replaces, on
SmolLM2's real weights (CPU, float32, greedy): the same tokens for prompts of different lengths decoded
together, with requests joining and leaving mid-way, directly and through the engine with a pool too small for
every request at once (requests then wait for blocks), and after blended prefills, whose KV the engine copies
into the pool."""

from __future__ import annotations

import asyncio

import pytest
import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.engine import LocalEngine
from blendgate.engine.kv_pool import BlockAllocator
from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.engine.runner import LlamaRunner
from blendgate.engine.sampling import SamplingParams

TEXTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an old",
         "1, 2, 3, 4,", "Water boils at a temperature of one hundred degrees Celsius at sea level, but on a high "
         "mountain the air pressure is lower, so"]


@pytest.fixture(scope="module")
def runner(loaded_model) -> LlamaRunner:
    return LlamaRunner(loaded_model)


@pytest.fixture(scope="module")
def prompts(loaded_model) -> list[list[int]]:
    return [loaded_model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in TEXTS]


def one_request(runner: LlamaRunner, ids: list[int] | Prompt, tokens: int) -> list[int]:
    """Greedy tokens through today's one-request path: the request's own KVCache, one token per forward."""
    with torch.inference_mode():
        logits, state = runner.prefill(ids if isinstance(ids, Prompt) else Prompt.plain(ids))
        out = [int(logits.argmax())]
        while len(out) < tokens:
            out.append(int(runner.decode(out[-1], state).argmax()))
    return out


def test_requests_joining_and_leaving_a_batch_get_their_one_request_tokens(runner, prompts) -> None:
    wanted = {0: 6, 1: 3, 3: 4}  # tokens per request (by its prompt): each leaves when it has them
    joins = {0: [0, 1], 2: [3]}  # step -> requests that join before it (3 after 1 has left, while 0 runs on)
    allocator = BlockAllocator(num_blocks=24, rows=2)
    decoder = runner.batch_decoder(allocator.num_blocks, allocator.rows, 256)
    generated: dict[int, list[int]] = {}
    running: list[int] = []
    with torch.inference_mode():
        for step in range(8):
            for i in joins.get(step, []):
                allocation = allocator.allocate(i, len(prompts[i]) + wanted[i])
                logits, state = runner.prefill(Prompt.plain(prompts[i]))
                decoder.pool.store(allocation, state.cache)
                generated[i] = [int(logits.argmax())]
                running.append(i)
            if not running:
                break
            allocations = [allocator.get(i) for i in running]
            positions = [len(prompts[i]) + len(generated[i]) - 1 for i in running]
            batch = DecodeBatch(tuple(running), tuple(generated[i][-1] for i in running), tuple(positions),
                                tuple(a.slot(p) for a, p in zip(allocations, positions)),
                                tuple(a.row for a in allocations))
            for i, token in zip(running, decoder.decode(batch).argmax(dim=-1).tolist()):
                generated[i].append(token)
            for i in [i for i in running if len(generated[i]) == wanted[i]]:
                running.remove(i)
                allocator.free(i)
    assert not running and allocator.free_blocks == 23
    for i, tokens in wanted.items():
        assert generated[i] == one_request(runner, prompts[i], tokens), TEXTS[i]


def test_the_engine_batches_requests_that_wait_for_kv_blocks(runner, loaded_model, prompts) -> None:
    # 64 tokens of pool (4 blocks): the first two requests (prompt + 6 new tokens: 1 and 2 blocks) take 3, so the
    # third waits for blocks while they decode.
    engine = LocalEngine(runner, max_context_tokens=64, stop_token_ids=frozenset(), max_running=3, max_waiting=8,
                         kv_pool_tokens=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)

    async def main() -> list[list[int]]:
        async def one(ids: list[int]) -> list[int]:
            return [event.token_id async for event in engine.submit(ids, params)]
        return list(await asyncio.gather(*(one(ids) for ids in prompts[:3])))

    try:
        results = asyncio.run(main())
        allocator = engine._scheduler.allocator
        assert engine.stats() == {"running": 0, "waiting": 0} and allocator.free_blocks == allocator.num_blocks - 1
    finally:
        engine.shutdown()
    for ids, tokens in zip(prompts, results):
        assert tokens == one_request(runner, ids, 6)


def test_an_engine_pool_smaller_than_one_context_is_refused(runner) -> None:
    with pytest.raises(ValueError, match="cannot hold one request"):
        LocalEngine(runner, max_context_tokens=64, stop_token_ids=frozenset(), kv_pool_tokens=32)


def test_blended_prefills_hand_their_kv_to_the_batched_decode(loaded_model) -> None:
    from blendgate.chunkcache.fallback import PrefillCosts
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import BlendingRunner
    from blendgate.chunkcache.tiers import MemoryTier

    # A few tokens a chunk do not pay for a blend: no per-chunk cost, so the runner blends them anyway.
    blending = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]),
                              costs=PrefillCosts(pass_tokens=0, placement_tokens=0))

    def encode(text: str) -> tuple[int, ...]:
        return tuple(loaded_model.tokenizer(text, add_special_tokens=False)["input_ids"])

    def blended(documents: list[str]) -> Prompt:
        segments = [PromptSegment(encode("<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>"
                                         "user\nDocuments:\n\n"))]
        for document in documents:
            segments.append(PromptSegment(encode(document + "\n\n"), is_chunk=True))
        segments.append(PromptSegment(encode("Question: What is the code?<|im_end|>\n<|im_start|>assistant\n")))
        return Prompt(segments, mode="blend", recompute_ratio=0.3)

    documents = ["The blue castle's secret code is 4711.", "The Silverrun river flows north for 312 kilometres."]
    prompts = [blended(documents), blended(documents[::-1])]
    engine = LocalEngine(blending, max_context_tokens=256, stop_token_ids=frozenset(), max_running=2)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)

    async def main() -> list[tuple[list[int], str | None]]:
        async def one(prompt: Prompt) -> tuple[list[int], str | None]:
            handle = engine.submit(prompt, params)
            tokens = [event.token_id async for event in handle]
            return tokens, handle.prefill_report.mode
        return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for prompt, (tokens, mode) in zip(prompts, results):
        assert mode == "blend" and tokens == one_request(blending, prompt, 5)

