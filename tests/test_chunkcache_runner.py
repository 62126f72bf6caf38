"""The blending runner on the real SmolLM2: modes agree where they must, chunk KV is cached and reused."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.runner import BlendingRunner
from blendgate.chunkcache.store import ChunkCacheStore, MemoryTier
from blendgate.engine.prompt import Prompt, PromptSegment

DOCUMENTS = ["The blue castle stands on a granite hill. Its secret code is 4711.\n\n",
             "The Silverrun river flows north for 312 kilometres.\n\n",
             "The corner bakery sells rye bread on Tuesdays.\n\n"]


@pytest.fixture()
def runner(loaded_model) -> BlendingRunner:
    return BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]))


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
        assert state.report["prefix_tokens_reused"] > 20
        blended, state = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend", ratio=1.0))
    torch.testing.assert_close(blended, full, atol=1e-3, rtol=1e-4)
    assert state.report["recompute_ratio"] == 1.0


def test_chunk_kv_is_cached_and_reused_in_any_order(runner, tokenizer) -> None:
    with torch.inference_mode():
        _, first = runner.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend"))
        _, reordered = runner.prefill(rag_prompt(tokenizer, DOCUMENTS[::-1], "blend"))
        _, reused = runner.prefill(rag_prompt(tokenizer, DOCUMENTS[1:], "reuse"))
    assert first.report["hits"] == [False, False, False]
    assert reordered.report["hits"] == [True, True, True]
    assert reused.report["hits"] == [True, True] and reused.report["recompute_ratio"] == 0.0
    assert 0.1 < first.report["recompute_ratio"] <= 0.2
    # Three chunks and the system prompt, whose exact KV is reused too.
    assert runner.store.report()["tiers"][0]["entries"] == 4
    assert first.report["prefix_tokens_reused"] > 0


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
        BlendingRunner(loaded_model, store, chunk_prefix="system").prefill(rag_prompt(tokenizer, DOCUMENTS, "reuse"))
        _, alone = BlendingRunner(loaded_model, store, chunk_prefix="none").prefill(
            rag_prompt(tokenizer, DOCUMENTS, "reuse"))
    assert alone.report["hits"] == [False, False, False]  # other keys: computed without the prefix
    assert len(store.tiers[0].entries) == 7  # 3 chunks each way, and the system prompt's own KV, shared
