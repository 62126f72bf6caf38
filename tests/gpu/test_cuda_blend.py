"""Our forward pass, CacheBlend and the GPU chunk-cache tier on CUDA, against transformers on the same GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from blendgate.chunkcache.blend import blend_prefill, precompute_chunk, precompute_chunks
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.selection import SelectionRule
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.engine.llama import LlamaFamilyModel
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers_on_cuda(model_type, dtype) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype).to("cuda").eval()
    ours = LlamaFamilyModel.from_transformers(reference)
    ids = torch.randint(0, 512, (300,), device="cuda")
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0].float()
        got = ours.forward(ids, None, ours.new_cache(16), last_only=False)
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


RULES = [SelectionRule("value"), SelectionRule("kv"), SelectionRule("value", gradual=2.0),
         SelectionRule("attention"), SelectionRule("attention", probe_layers=2, sink_tokens=4),
         SelectionRule("attention_value"), SelectionRule("attention", chunk_budget="uniform"),
         SelectionRule("key"), SelectionRule("attention_key"), SelectionRule("attention", drift_shift=0.5)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.score}-p{r.probe_layers}-s{r.sink_tokens}-g{r.gradual}"
                         f"-{r.chunk_budget}")
def test_blend_limits_on_cuda(rule) -> None:
    model = LlamaFamilyModel.random(tiny_config(), device="cuda", dtype=torch.float32, seed=3)
    generator = torch.Generator().manual_seed(1)
    prefix, suffix = torch.randint(0, 512, (8,), generator=generator).tolist(), [5, 6, 7, 8]
    chunks = [torch.randint(0, 512, (64,), generator=generator).tolist() for _ in range(4)]
    cached = [precompute_chunk(model, c) for c in chunks]
    ids = prefix + [t for c in chunks for t in c] + suffix
    with torch.no_grad():
        full = model.forward(torch.tensor(ids, device="cuda"), None,
                             model.new_cache(len(ids)))[-1]
    blended = blend_prefill(model, [prefix, *cached, suffix], 1.0, rule=rule)
    torch.testing.assert_close(blended.logits, full, atol=1e-3, rtol=1e-3)
    partial = blend_prefill(model, [prefix, *cached, suffix], 0.15, rule=rule)
    assert partial.recomputed_chunk_tokens == 39  # ceil(0.15 * 256)
    assert partial.selected_rows.unique().numel() == 39
    assert blend_prefill(model, [prefix, *cached, suffix], 0.0, rule=rule).recomputed_chunk_tokens == 0
    if rule.score != "value" or rule.gradual == 1.0:
        targeted = blend_prefill(model, [prefix, *cached, suffix], 0.5, rule=rule, target_fidelity=0.5)
        assert 0 < targeted.recomputed_chunk_tokens <= 128 and targeted.covered is not None


def test_gpu_tier_keeps_kv_on_the_gpu_and_demotes_to_cpu() -> None:
    entry = ChunkKV(torch.arange(16), torch.randn(4, 2, 16, 32), torch.randn(4, 2, 16, 32))
    store = ChunkCacheStore([MemoryTier("gpu", entry.nbytes, "cuda"), MemoryTier("cpu", 4 * entry.nbytes, "cpu")])
    first, second = ChunkKey.of("m", [], [1]), ChunkKey.of("m", [], [2])
    store.put(first, entry, 16)
    assert store.get(first).keys.device.type == "cuda"
    store.put(second, entry, 16)
    demoted = store.tiers[1].read(first)  # copied down into pinned memory, waited for on reading
    assert first in store.tiers[1].entries and demoted.keys.device.type == "cpu" and demoted.keys.is_pinned()
    assert torch.equal(demoted.keys, entry.keys) and torch.equal(demoted.values, entry.values)
    assert F.mse_loss(store.get(first).keys.cpu(), entry.keys) == 0
    # A copy down queued behind GPU work: what the host reads is what that work computed.
    cpu, third = MemoryTier("cpu", 1 << 30, "cpu"), ChunkKey.of("m", [], [3])
    big = torch.randn(4, 2, 4096, 32, device="cuda")
    cpu.write(third, ChunkKV(torch.arange(4096), big * 2, big * 3))  # still being computed when copied
    assert torch.equal(cpu.read(third).values, (big * 3).cpu()) and torch.equal(cpu.read(third).keys, (big * 2).cpu())


def test_a_reserved_cpu_tier_takes_demoted_entries_without_pinning_new_memory() -> None:
    from blendgate.chunkcache.tiers import pinned_block_bytes
    from blendgate.sglang_plugin.profile import host_alloc_us

    def host_allocs() -> int:  # pinned blocks the caching host allocator has created so far
        return int(torch.cuda.host_memory_stats().get("num_host_alloc", 0))

    tensor = 4 * 2 * 500 * 32 * 2  # a 500-token chunk's bf16 keys: 256,000 bytes, a 256 KiB block
    cpu = MemoryTier("cpu", 8 * 2 * pinned_block_bytes(tensor), "cpu")
    assert cpu.pinned and cpu.reserve(tensor) == cpu.budget_bytes == cpu.reserved_bytes
    # SGLang captures its CUDA graphs after the plugin has started, and a capture empties the caching host
    # allocator's cache (torch.cuda.graph): the reservation must not sit there.
    graph, counter = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
    with torch.cuda.graph(graph):
        counter.add_(1)
    before, pinning = host_allocs(), host_alloc_us()
    for n in range(8):  # eight chunks computed on the GPU, copied down: each takes two reserved blocks
        keys, values = (torch.randn(4, 2, 500 - n, 32, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        taken = cpu.write(ChunkKey.of("m", [], [n]), ChunkKV(torch.arange(500 - n), keys, values))
        assert taken == (500 - n) * 8 + 2 * pinned_block_bytes(tensor)  # counted at the blocks they hold
        assert torch.equal(cpu.read(ChunkKey.of("m", [], [n])).keys, keys.cpu())
    assert host_allocs() == before and host_alloc_us() == pinning and cpu.reserved_bytes == 0
    assert MemoryTier("gpu", 1 << 20, "cuda").reserve(tensor) == 0  # only a CPU tier is pinned


def test_a_cpu_memory_hit_blends_from_pinned_memory_and_is_promoted_after() -> None:
    model = LlamaFamilyModel.random(tiny_config(), device="cuda", dtype=torch.bfloat16, seed=4)
    generator = torch.Generator().manual_seed(2)
    prefix, suffix = torch.randint(0, 512, (8,), generator=generator).tolist(), [5, 6, 7, 8]
    chunk = torch.randint(0, 512, (64,), generator=generator).tolist()
    kv = precompute_chunk(model, chunk, prefix)
    store = ChunkCacheStore([MemoryTier("gpu", 1, "cuda"), MemoryTier("cpu", 4 * kv.nbytes, "cpu")])
    key = ChunkKey.of("m", prefix, chunk)
    store.put(key, kv, 64)  # too big for the GPU tier's budget: lands in CPU memory, pinned
    found = store.get(key, promote=False)
    assert found.keys.device.type == "cpu" and found.keys.is_pinned()
    streamed = blend_prefill(model, [prefix, found, suffix], 0.15)
    on_gpu = blend_prefill(model, [prefix, kv, suffix], 0.15)
    torch.testing.assert_close(streamed.logits, on_gpu.logits, atol=0, rtol=0)
    store.tiers[0].budget_bytes = 4 * kv.nbytes
    store.promote(key, found)
    assert store.get(key).keys.device.type == "cuda"


@pytest.mark.parametrize("ratio", [0.0, 0.15, 1.0])
def test_an_exact_prefix_kv_changes_nothing_but_the_work_on_cuda(ratio) -> None:
    model = LlamaFamilyModel.random(tiny_config(), device="cuda", dtype=torch.float32, seed=6)
    generator = torch.Generator().manual_seed(3)
    prefix, suffix = torch.randint(0, 512, (24,), generator=generator).tolist(), [5, 6, 7, 8]
    chunks = [precompute_chunk(model, torch.randint(0, 512, (100,), generator=generator).tolist(), prefix)
              for _ in range(3)]
    computed = blend_prefill(model, [prefix, *chunks, suffix], ratio)
    reused = blend_prefill(model, [prefix, *chunks, suffix], ratio, prefix_kv=precompute_chunk(model, prefix))
    torch.testing.assert_close(reused.logits, computed.logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix_tokens", [0, 24])
def test_chunks_computed_side_by_side_on_cuda_are_each_computed_alone(dtype, prefix_tokens) -> None:
    """precompute_chunks on CUDA (SDPA causal from the bottom right, padded chunks) against precompute_chunk
    (our fused causal or sparse kernels) for each chunk."""
    model = LlamaFamilyModel.random(tiny_config(), device="cuda", dtype=dtype, seed=7)
    generator = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 512, (prefix_tokens,), generator=generator).tolist()
    chunks = [torch.randint(0, 512, (n,), generator=generator).tolist() for n in (100, 37, 128)]
    alone = [precompute_chunk(model, chunk, prefix) for chunk in chunks]
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for one, other in zip(alone, precompute_chunks(model, chunks, prefix)):
        torch.testing.assert_close(other.keys, one.keys, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(other.values, one.values, atol=tolerance, rtol=tolerance)


def test_auto_pass_cost_is_measured_on_the_gpu() -> None:
    """ChunkBlender.calibrate with "auto" on a GPU: a pass's fixed cost measured (launch-bound passes), the
    blend-or-full-prefill rule deciding with it."""
    from blendgate.chunkcache.fallback import PrefillCosts
    from blendgate.chunkcache.runner import ChunkBlender

    model = LlamaFamilyModel.random(tiny_config(), device="cuda", dtype=torch.bfloat16, seed=3)
    blender = ChunkBlender(model, ChunkCacheStore([MemoryTier("gpu", 1 << 30, "cuda")]))
    measured = blender.measure_prefill(tokens=128, small=8, repeats=3)
    assert measured.tokens_per_s > 0 and measured.pass_tokens > 0  # a tiny model's pass is all launches
    costs = blender.calibrate("auto", 1.0)
    assert costs.placement_tokens == 1.0 and costs.pass_tokens > 0
    assert blender.calibrate(5.0, 1.0) == PrefillCosts(5.0, 1.0)
