"""A chunk's KV computed in a context of its own (PromptSegment.context), on the real SmolLM2: kept apart per
context, the same numbers as the prompt-wide chunk_context path, exact at r = 1, seen alike by locate,
fallback and blend."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.fallback import PrefillCosts
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.runner import BlendingRunner
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.engine.prompt import Prompt, PromptSegment

DOCUMENTS = ["The blue castle stands on a granite hill. Its secret code is 4711.",
             "The Silverrun river flows north for 312 kilometres.",
             "The corner bakery sells rye bread on Tuesdays."]
# What precedes each document in its source (the first has nothing: the prompt's chunk_context).
BEFORE = ["", "[1] The castle was built in 1420 by the counts of Arn.\n\n[2]",
          "[1] The town market opens at seven every morning.\n\n[2]"]
BLEND_ALWAYS = PrefillCosts(pass_tokens=0, placement_tokens=0)


def encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()


def prompt_with(tokenizer, documents: list[str], contexts: list[str], mode: str, ratio: float = 0.15,
                chunk_context: str = "") -> Prompt:
    segments = [PromptSegment(encode(tokenizer, "<|im_start|>system\nAnswer from the documents.<|im_end|>\n"
                                                "<|im_start|>user\nDocuments:"))]
    for i, (document, context) in enumerate(zip(documents, contexts), start=1):
        segments += [PromptSegment(encode(tokenizer, f"\n\n[{i}]")),
                     PromptSegment(encode(tokenizer, f" {document}"), is_chunk=True,
                                   context=encode(tokenizer, context))]
    segments.append(PromptSegment(encode(tokenizer, "\n\nQuestion: What is the secret code?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")))
    return Prompt(segments, mode=mode, recompute_ratio=ratio, chunk_context=encode(tokenizer, chunk_context))


@pytest.fixture()
def runner(loaded_model) -> BlendingRunner:
    return BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=BLEND_ALWAYS)


def test_a_chunk_under_two_contexts_is_two_entries(runner, tokenizer) -> None:
    with torch.inference_mode():
        _, first = runner.prefill(prompt_with(tokenizer, DOCUMENTS[1:2], BEFORE[1:2], "reuse"))
        _, other = runner.prefill(prompt_with(tokenizer, DOCUMENTS[1:2], BEFORE[2:3], "reuse"))
        _, again = runner.prefill(prompt_with(tokenizer, DOCUMENTS[1:2], BEFORE[1:2], "reuse"))
    assert first.report.hits == [False] and other.report.hits == [False] and again.report.hits == [True]
    # The chunk under each context, and the system prompt's own KV.
    assert runner.store.report()["tiers"][0]["entries"] == 3


def test_a_chunks_own_context_equals_the_same_context_for_the_whole_prompt(loaded_model, tokenizer) -> None:
    context = BEFORE[1]
    own = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=BLEND_ALWAYS)
    wide = BlendingRunner(loaded_model, ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")]), costs=BLEND_ALWAYS)
    own_prompt = prompt_with(tokenizer, DOCUMENTS[:1], [context], "blend")
    wide_prompt = prompt_with(tokenizer, DOCUMENTS[:1], [""], "blend", chunk_context=context)
    (prefix,) = own.blender.chunk_prefixes(own_prompt)
    assert wide.blender.chunk_prefixes(wide_prompt) == [prefix]
    with torch.inference_mode():
        own_logits, _ = own.prefill(own_prompt)
        wide_logits, _ = wide.prefill(wide_prompt)
    chunk = next(segment.token_ids for segment in own_prompt.segments if segment.is_chunk)
    key = own.blender.chunk_key(prefix, chunk)
    own_kv, wide_kv = own.store.get(key), wide.store.get(key)
    # The context continued from the kept system prompt's KV, or computed with it in one pass: the same KV.
    torch.testing.assert_close(own_kv.keys, wide_kv.keys, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(own_kv.values, wide_kv.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(own_logits, wide_logits, atol=1e-3, rtol=1e-4)


def test_with_own_contexts_recomputing_everything_is_a_full_prefill(runner, tokenizer) -> None:
    with torch.inference_mode():
        full, _ = runner.prefill(prompt_with(tokenizer, DOCUMENTS, BEFORE, "full_prefill"))
        blended, state = runner.prefill(prompt_with(tokenizer, DOCUMENTS, BEFORE, "blend", ratio=1.0))
    torch.testing.assert_close(blended, full, atol=1e-3, rtol=1e-4)
    assert state.report.recompute_ratio == 1.0


def test_locate_and_fallback_see_the_keys_blend_uses(runner, tokenizer) -> None:
    prompt = prompt_with(tokenizer, DOCUMENTS, BEFORE, "blend", chunk_context="[1] An atlas is a book of maps.\n\n[2]")
    prefixes = runner.blender.chunk_prefixes(prompt)
    assert len(set(prefixes)) == 3  # the first chunk after the prompt's chunk_context, the others their own
    assert [source.hit for source in runner.blender.locate(prompt)] == [False, False, False]
    costly = PrefillCosts(pass_tokens=1000, placement_tokens=0)
    assert runner.blender.fallback(prompt, costly) is not None  # three misses: not worth it
    with torch.inference_mode():
        _, state = runner.prefill(prompt)
    assert state.report.hits == [False, False, False]
    assert [source.hit for source in runner.blender.locate(prompt)] == [True, True, True]
    assert runner.blender.fallback(prompt, costly) is None  # all cached now, under the keys blend stored
