"""The plugin's per-request prefill on the CPU (sglang_plugin/prefill.py, tiny random-weight model): a request
computed after a cached prefix read back in SGLang's pool layout gives a full prefill's numbers, and a blending
request whose cached prefix lies in its system prompt gives the blend's, only its new tokens' KV to write; one
whose prefix reaches into its chunks reuses that prefix's KV exactly and blends the chunks after it (at ratio 1:
a full prefill's numbers).
SGLang's side (reading its pool, writing into it, its logits) runs on the GPU: tests/gpu/test_sglang_worker.py."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.runner import ChunkBlender
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.engine.prompt import Prompt, PromptSegment
from blendgate.sglang_plugin.plan import RequestPlan
from blendgate.sglang_plugin.prefill import prefetch_chunks, prefill_request
from blendgate.sglang_plugin.protocol import fallback_report
from support import tiny_llama


@pytest.fixture(scope="module")
def blender() -> ChunkBlender:
    model = tiny_llama(layers=3, heads=4, seed=5, max_positions=512)
    return ChunkBlender(model, ChunkCacheStore([MemoryTier("cpu", 1 << 26, "cpu")]))


def ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, 200, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def pool_reader(cache, length: int):
    """The prefix's KV as SGLang's pool gives it: [tokens, kv_heads, head_dim] per layer."""
    return lambda layer: (cache.keys[layer, :, :length].transpose(0, 1),
                          cache.values[layer, :, :length].transpose(0, 1))


@pytest.mark.parametrize("prefix", [0, 1, 9])
def test_a_request_computed_after_its_cached_prefix_is_a_full_prefill(blender, prefix) -> None:
    model, tokens = blender.model, torch.tensor(ids(20, 1))
    full = model.new_cache(20)
    expected = model.forward(tokens, None, full, logits=False)[0]
    report = fallback_report("blend", "the prompt was split by chunked prefill")
    done = prefill_request(blender, RequestPlan(prefix, 20 - prefix, report=report), tokens[prefix:],
                           pool_reader(full, prefix))
    assert done.report == report and done.start == prefix
    torch.testing.assert_close(done.last_hidden, expected, atol=1e-4, rtol=1e-4)
    for layer in range(model.num_layers):
        keys, values = done.new_kv(layer)
        assert keys.shape == (20 - prefix, model.kv_heads, model.head_dim)
        torch.testing.assert_close(keys, full.keys[layer, :, prefix:20].transpose(0, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(values, full.values[layer, :, prefix:20].transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_a_blending_request_with_a_cached_system_prompt_writes_only_its_new_tokens(blender) -> None:
    system = ids(6, 2)
    prompt = Prompt([PromptSegment(tuple(system)), PromptSegment(tuple(ids(10, 3)), True),
                     PromptSegment(tuple(ids(8, 4)), True), PromptSegment(tuple(ids(5, 5)))],
                    mode="blend", recompute_ratio=0.3)
    reference, _ = blender.blend(prompt, logits=False)  # the chunks computed and stored: the plugin's are hits
    done = prefill_request(blender, RequestPlan(len(system), len(prompt) - len(system), prompt),
                           torch.tensor(prompt.token_ids[len(system):]), None)
    assert done.report["mode"] == "blend" and done.report["hit_count"] == 2
    torch.testing.assert_close(done.last_hidden, reference.hidden)
    keys, values = done.new_kv(0)
    assert keys.shape[0] == len(prompt) - len(system)
    torch.testing.assert_close(keys, reference.cache.keys[0, :, len(system):len(prompt)].transpose(0, 1))


def test_a_prefix_without_a_reader_is_refused(blender) -> None:
    with pytest.raises(ValueError, match="prefix"):
        prefill_request(blender, RequestPlan(3, 2), torch.tensor([1, 2]), None)


def test_every_layers_new_kv_at_once_is_each_layers(blender) -> None:
    model, tokens = blender.model, torch.tensor(ids(20, 7))
    full = model.new_cache(20)
    model.forward(tokens, None, full, logits=False)
    done = prefill_request(blender, RequestPlan(6, 14), tokens[6:], pool_reader(full, 6))
    keys, values = done.new_kv_layers()
    assert keys.shape == values.shape == (model.num_layers, 14, model.kv_heads, model.head_dim)
    assert keys.is_contiguous() and values.is_contiguous()
    for layer in range(model.num_layers):
        assert torch.equal(keys[layer], done.new_kv(layer)[0]) and torch.equal(values[layer], done.new_kv(layer)[1])


def rag_prompt(ratio: float) -> Prompt:
    return Prompt([PromptSegment(tuple(ids(6, 11))), PromptSegment(tuple(ids(10, 12)), True),
                   PromptSegment(tuple(ids(8, 13)), True), PromptSegment(tuple(ids(5, 14)))],
                  mode="blend", recompute_ratio=ratio)


@pytest.mark.parametrize("prefix", [16, 12])  # the first chunk's end (a radix-cache match), and inside it
def test_a_blend_after_a_cached_prefix_past_the_system_prompt_reuses_it_exactly(blender, prefix) -> None:
    model = blender.model
    exact = rag_prompt(1.0)  # recompute everything after the head: a full prefill's numbers
    full = model.new_cache(len(exact))
    expected = model.forward(torch.tensor(exact.token_ids), None, full, logits=False)[0]
    for prompt in (exact, rag_prompt(0.3)):
        done = prefill_request(blender, RequestPlan(prefix, len(prompt) - prefix, prompt, exact_head=True),
                               torch.tensor(prompt.token_ids[prefix:]), pool_reader(full, prefix))
        # Only the chunk after the head is blended (and reported); the head is reused as read.
        assert done.report["mode"] == "blend" and len(done.report["hits"]) == 1, done.report
        assert done.report["prefix_tokens_reused"] == prefix and done.start == prefix
        assert torch.equal(done.cache.keys[:, :, :prefix], full.keys[:, :, :prefix])
        assert done.new_kv_layers()[0].shape[1] == len(prompt) - prefix
        if prompt is exact:
            torch.testing.assert_close(done.last_hidden, expected, atol=1e-4, rtol=1e-4)


def test_a_head_that_is_not_the_prompts_start_is_refused(blender) -> None:
    from blendgate.chunkcache.kv import ExactHead

    prompt, cache = rag_prompt(0.3), blender.model.new_cache(40)
    blender.model.forward(torch.tensor(prompt.token_ids), None, cache, logits=False)
    head = lambda ids_, n: ExactHead(torch.tensor(ids_), cache.keys[:, :, :n], cache.values[:, :, :n])  # noqa: E731
    with pytest.raises(ValueError, match="first tokens"):
        blender.blend(prompt, head=head([0] * 16, 16))
    with pytest.raises(ValueError, match="first segment"):
        blender.blend(prompt, head=head(prompt.token_ids[:4], 4))
    with pytest.raises(ValueError, match="nothing to blend"):
        blender.blend(prompt, head=head(prompt.token_ids[:26], 26))


def test_a_profile_mark_brackets_the_computing_of_uncached_chunks(blender) -> None:
    # prefill_pass marks "misses" once the chunks the store lacks are computed and "prefill" after the blends: a
    # pass profile (sglang_plugin/profile.py) books the work before the first mark to the misses.
    from blendgate.sglang_plugin.prefill import prefill_pass

    prompt = Prompt([PromptSegment(tuple(ids(6, 20))), PromptSegment(tuple(ids(10, 21)), True),
                     PromptSegment(tuple(ids(8, 22)), True), PromptSegment(tuple(ids(5, 23)))],
                    mode="blend", recompute_ratio=0.3)
    stored = lambda: sum(len(tier.entries) for tier in blender.store.tiers)  # noqa: E731
    before, marks = stored(), []
    (done,) = prefill_pass(blender, [RequestPlan(0, len(prompt), prompt)], [torch.tensor(prompt.token_ids)], [None],
                           mark=lambda stage: marks.append((stage, stored())))
    assert [stage for stage, _ in marks] == ["misses", "prefill"]
    # the system prompt alone and both chunks computed before the first mark, nothing after it
    assert marks[0][1] == before + 3 and marks[1][1] == marks[0][1] and done.report["hit_count"] == 0


def test_a_passs_requests_have_their_chunks_computed_in_one_forward_pass_and_blend_as_alone(monkeypatch) -> None:
    # Two blended requests sharing a system prompt and one chunk, each with a chunk of its own, none cached: the
    # pass computes the three chunks side by side once (prefetch_chunks), and each request blends to the numbers
    # it gets alone, its report saying which chunks were not cached.
    import blendgate.chunkcache.runner as runner_module

    model = tiny_llama(layers=3, heads=4, seed=5, max_positions=512)
    system, shared, question = ids(6, 30), ids(10, 31), ids(5, 34)

    def prompt(own_seed: int) -> Prompt:
        return Prompt([PromptSegment(tuple(system)), PromptSegment(tuple(shared), True),
                       PromptSegment(tuple(ids(8, own_seed)), True), PromptSegment(tuple(question))],
                      mode="blend", recompute_ratio=0.3)

    first, second = prompt(32), prompt(33)
    alone = ChunkBlender(model, ChunkCacheStore([MemoryTier("cpu", 1 << 26, "cpu")]))
    expected = [alone.blend(p, logits=False)[0].hidden for p in (first, second)]

    passes = []
    real = runner_module.precompute_chunks
    monkeypatch.setattr(runner_module, "precompute_chunks",
                        lambda model, chunks, *rest: passes.append(len(chunks)) or real(model, chunks, *rest))
    blender = ChunkBlender(model, ChunkCacheStore([MemoryTier("cpu", 1 << 26, "cpu")]))
    plans = [RequestPlan(0, len(p), p) for p in (first, second)] + [RequestPlan(0, 4)]  # and a plain request
    known = prefetch_chunks(blender, plans)
    # the system prompt alone (the blends reuse its exact KV), and the three chunks after it side by side
    assert sorted(passes) == [1, 3] and len(known.kvs) == 4 and len(known.sources) == 3
    located = []  # the blends take the prefetch's sources: no second lookup (a shared tier's round trip)
    real_locate = blender.store.locate
    monkeypatch.setattr(blender.store, "locate", lambda *a, **k: located.append(a) or real_locate(*a, **k))
    done = [prefill_request(blender, plan, torch.tensor(plan.prompt.token_ids), None, known=known)
            for plan in plans[:2]]
    assert sorted(passes) == [1, 3] and located == []  # nothing more computed or looked up by the blends
    for prefilled, reference in zip(done, expected):
        torch.testing.assert_close(prefilled.last_hidden, reference)
    assert done[0].report["hits"] == [False, False] and done[1].report["hits"] == [False, False]
    # Once stored, a later pass finds them: no pass at all.
    assert all(hit for _, hit in prefetch_chunks(blender, plans).kvs.values()) and len(passes) == 2


def test_a_whole_pass_is_each_request_prefilled_alone(blender) -> None:
    # prefill_pass: a blend from scratch, a blend after a radix-cache match past its system prompt, a plain request
    # after a cached prefix and one without: the blends run together, the same numbers and reports as alone.
    from blendgate.sglang_plugin.prefill import prefill_pass

    model = blender.model
    exact_prompt, plain = rag_prompt(0.3), ids(9, 40)
    full = model.new_cache(len(exact_prompt))
    model.forward(torch.tensor(exact_prompt.token_ids), None, full, logits=False)
    plain_full = model.new_cache(len(plain))
    model.forward(torch.tensor(plain), None, plain_full, logits=False)
    other = Prompt([PromptSegment(tuple(ids(6, 11))), PromptSegment(tuple(ids(7, 41)), True),
                    PromptSegment(tuple(ids(5, 42)))], mode="blend", recompute_ratio=0.5)
    plans = [RequestPlan(0, len(other), other), RequestPlan(16, len(exact_prompt) - 16, exact_prompt, exact_head=True),
             RequestPlan(4, len(plain) - 4), RequestPlan(0, len(plain))]
    tokens = [torch.tensor(other.token_ids), torch.tensor(exact_prompt.token_ids[16:]), torch.tensor(plain[4:]),
              torch.tensor(plain)]
    readers = [None, pool_reader(full, 16), pool_reader(plain_full, 4), None]
    alone = [prefill_request(blender, plan, ids_, reader) for plan, ids_, reader in zip(plans, tokens, readers)]
    marks = []
    together = prefill_pass(blender, plans, tokens, readers, mark=marks.append)
    assert marks == ["misses", "prefill"]
    cached = ("hits", "hit_count", "miss_count")  # what the store held: alone put the chunks in it
    for one, both in zip(alone, together):
        assert both.start == one.start
        if one.report is not None and "hits" in one.report:
            assert all(both.report["hits"]) and {k: v for k, v in both.report.items() if k not in cached} == \
                {k: v for k, v in one.report.items() if k not in cached}
        else:
            assert both.report == one.report
        torch.testing.assert_close(both.last_hidden, one.last_hidden, atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(both.new_kv_layers(), one.new_kv_layers()):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        prefill_pass(blender, plans[1:2], tokens[1:2], [None])
