"""SpeCache on CUDA: the low-bit key kernels (kernels/lowbit_keys.py, 1 and 2 bits, groups of 32 and 64) and
the pair copies from and to pinned host memory (kernels/pair_copy.py) and the residency update from pinned host
memory (kernels/residency.py: the same table, pool rows and counts) against their PyTorch references, and
the eager SpeCache step (engine/specache.py) with a budget of the whole context against the full-KV batched
decode (logits within bf16 tolerance, fed the same tokens), and with a small budget at 2-bit keys in groups of
32 and the eightfold settings' 1-bit keys in groups of 64 (runs, the resident top-k slots hold the host's
pairs, the prefetch copies are counted, completed groups are quantised, and a step never synchronises with
the device: torch's sync debug mode set to error around it); and the CUDA graph of the steady step
(engine/specache_graph.py) against the eager step over 130 steps (the same logits, residency tables, pool
slots, counts, host tier and low-bit keys)."""

from __future__ import annotations

import pytest
import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.decode import BatchDecoder
from blendgate.engine.kv_pool import BlockAllocator, blocks_for
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.paged_kv import PagedKVPool
from blendgate.engine.specache import SpeCacheDecoder
from blendgate.engine.specache_policy import SpeCacheSettings
from blendgate.kernels.lowbit_keys import quantize, quantize_reference, score, score_reference
from blendgate.kernels.pair_copy import copy_pairs, copy_pairs_reference
from blendgate.kernels.residency import ResidencyScratch, make_resident, make_resident_reference
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_codes_agree(keys: torch.Tensor, bits: int, group: int, codes: torch.Tensor, reference) -> None:
    """`codes` (packed, as the kernel writes them) are the reference's (quantize_reference of `keys`), except by
    one level where a value sits on a rounding half, (x - low) / step = n + 0.5 to within float32 division's
    error: both codes are then equally near it."""
    per = 8 // bits
    shifts = torch.arange(per, device=keys.device, dtype=torch.uint8) * bits

    def unpacked(packed: torch.Tensor) -> torch.Tensor:
        return ((packed[..., None] >> shifts) & (2**bits - 1)).flatten(-2).int()

    ours, theirs = unpacked(codes), unpacked(reference.codes)
    differ = ours != theirs
    if not bool(differ.any()):
        return
    kv_heads, tokens, head_dim = keys.shape
    grouped = keys.float().view(kv_heads, tokens // group, group, head_dim)
    low = reference.zeros.float()[:, :, None]
    step = reference.steps.float()[:, :, None]
    ratio = ((grouped - low) / torch.where(step > 0, step, torch.ones_like(step))).view(kv_heads, tokens, head_dim)
    assert int((ours - theirs).abs().max()) == 1
    assert float((ratio[differ] - ratio[differ].floor() - 0.5).abs().max()) < 1e-4, "codes differ off a half"


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (9, 3, 64), (28, 4, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_lowbit_kernels_match_their_references(bits, group, heads, kv_heads, head_dim, dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(bits + heads)
    keys = torch.randn(kv_heads, 64 * group, head_dim, device="cuda", generator=generator).to(dtype)
    reference, got = quantize_reference(keys, bits, group), quantize(keys, bits, group)
    assert_codes_agree(keys, bits, group, got.codes, reference)
    torch.testing.assert_close(got.zeros, reference.zeros)
    torch.testing.assert_close(got.steps, reference.steps)
    q = torch.randn(heads, head_dim, device="cuda", generator=generator).to(dtype)
    tokens = 64 * group - 7
    torch.testing.assert_close(score(q, reference, tokens), score_reference(q, reference)[:, :tokens],
                               atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_pair_copies_read_and_write_pinned_host_memory(head_dim) -> None:
    generator = torch.Generator().manual_seed(head_dim)
    host = torch.randn(8, 4096, head_dim, generator=generator).to(torch.bfloat16).pin_memory()
    pool = torch.randn(8, 512, head_dim, generator=generator).to(torch.bfloat16)
    src_index = torch.randint(0, 4096, (8, 300), generator=generator)
    dst_index = torch.stack([torch.randperm(512, generator=generator)[:300] for _ in range(8)])
    take = torch.rand(8, 300, generator=generator) < 0.3
    expected = pool.clone()
    copy_pairs_reference(host, src_index, expected, dst_index, take)
    device_pool = pool.cuda()
    copy_pairs(host, src_index.cuda(), device_pool, dst_index.cuda(), take.cuda())  # host -> GPU by index
    torch.cuda.synchronize()
    assert torch.equal(device_pool.cpu(), expected)
    slot, position = torch.tensor([17], device="cuda"), torch.tensor([[4000]], device="cuda")
    copy_pairs(device_pool, slot.view(1, 1).expand(8, 1), host, position.expand(8, 1))  # GPU -> host
    torch.cuda.synchronize()
    assert torch.equal(host[:, 4000], expected[:, 17])


@pytest.mark.parametrize("kv_heads, top_k, m, hit_share", [(8, 1916, 1916, 0.05), (8, 1916, 1916, 0.6),
                                                            (8, 1916, 1000, 0.0), (4, 300, 300, 1.0)])
def test_the_residency_kernel_matches_its_reference_from_pinned_memory(kv_heads, top_k, m, hit_share) -> None:
    generator = torch.Generator().manual_seed(top_k + m)
    capacity, slots, head_dim = 32768, top_k + 200, 128
    host_keys = torch.randn(kv_heads, capacity, head_dim, generator=generator).to(torch.bfloat16).pin_memory()
    host_values = torch.randn(kv_heads, capacity, head_dim, generator=generator).to(torch.bfloat16).pin_memory()
    pool = [torch.randn(kv_heads, slots, head_dim, generator=generator).to(torch.bfloat16) for _ in range(2)]
    resident = torch.stack([torch.randperm(capacity, generator=generator)[:top_k] for _ in range(kv_heads)])
    targets = torch.randperm(slots, generator=generator)[:top_k]
    hits = int(hit_share * m)
    wanted = torch.stack([torch.cat([row[torch.randperm(top_k, generator=generator)[:hits]],
                                     torch.tensor(sorted(set(range(capacity)) - set(row.tolist())))[
                                         torch.randperm(capacity - top_k, generator=generator)[: m - hits]]])
                          for row in resident])
    wanted = wanted[:, torch.randperm(m, generator=generator)]
    expected = [resident.clone(), pool[0].clone(), pool[1].clone(), torch.zeros(2, dtype=torch.long)]
    make_resident_reference(wanted, expected[0], targets, host_keys, host_values, expected[1], expected[2],
                            expected[3])
    got = [resident.cuda(), pool[0].cuda(), pool[1].cuda(), torch.zeros(2, dtype=torch.long, device="cuda")]
    scratch = ResidencyScratch.empty(kv_heads, capacity, top_k, torch.device("cuda"))
    make_resident(wanted.cuda(), got[0], targets.cuda(), host_keys, host_values, got[1], got[2], got[3], scratch)
    torch.cuda.synchronize()
    for g, e in zip(got, expected):
        assert torch.equal(g.cpu(), e)
    assert not bool(scratch.marks.any())


@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return LlamaFamilyModel.random(tiny_config(max_positions=8192), device="cuda", dtype=torch.bfloat16, seed=5)


def prefill(model: LlamaFamilyModel, length: int, extra: int):
    ids = torch.randint(0, 512, (length,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    cache = model.new_cache(length + extra)
    return int(model.forward(ids, None, cache)[-1].argmax()), cache


def test_a_whole_context_budget_decodes_as_full_kv(model) -> None:
    length, steps = 700, 6
    with torch.inference_mode():
        first, cache = prefill(model, length, steps + 1)
        allocator = BlockAllocator(blocks_for(length + steps + 1) + 1, 1)
        pool = PagedKVPool(model, allocator.num_blocks, 1, blocks_for(length + steps + 1))
        full = BatchDecoder(model, pool, 1, length + steps + 1, graphs=True)
        allocation = allocator.allocate(0, length + steps + 1)
        pool.store(allocation, cache)
        tokens, full_logits = [first], []
        for p in range(length, length + steps):
            logits = full.decode(DecodeBatch((0,), (tokens[-1],), (p,), (allocation.slot(p),), (allocation.row,)))
            full_logits.append(logits[0].clone())
            tokens.append(int(logits[0].argmax()))
        settings = SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_tokens=1024)
        spool = PagedKVPool(model, blocks_for(1024) + 1, 1, blocks_for(1024))
        decoder = SpeCacheDecoder(model, spool, settings)
        decoder.admit(0, BlockAllocator(blocks_for(1024) + 1, 1).allocate(0, 1024), cache, steps + 1)
        for step in range(steps):  # fed full KV's tokens: near-tied random logits may pick others
            logits = decoder.decode(decoder.batch([0], [tokens[step]]))
            torch.testing.assert_close(logits[0], full_logits[step], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("settings", [
    SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_fraction=0.1, bits=2),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, selected_share=0.25),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, select_every=4),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, speculate=True),
], ids=["2-bit-group-32", "eightfold-1-bit-group-64", "eightfold-selecting-a-quarter", "eightfold-selecting-every-4",
        "eightfold-speculating"])
def test_a_small_budget_runs_with_resident_pairs_equal_to_the_hosts(model, settings) -> None:
    length, steps = 4000, 72  # a group of low-bit keys (32 or 64 tokens) is completed mid-way
    with torch.inference_mode():
        first, cache = prefill(model, length, steps + 1)
        budget = settings.budget(length)
        pool = PagedKVPool(model, blocks_for(budget.tokens) + 1, 1, blocks_for(budget.tokens))
        decoder = SpeCacheDecoder(model, pool, settings)
        request = decoder.admit(0, BlockAllocator(blocks_for(budget.tokens) + 1, 1).allocate(0, budget.tokens),
                                cache, steps + 1)
        token = first
        for step in range(steps):
            batch = decoder.batch([0], [token])
            if step:  # the first step warms up (Triton compiles, pinned buffers are made)
                torch.cuda.set_sync_debug_mode("error")
            try:
                logits = decoder.decode(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            token = int(logits.argmax(dim=-1)[0])
        torch.cuda.synchronize()
    base = budget.sink_tokens + budget.recent_tokens
    assert request.guessed == (steps - 1 if settings.speculate else 0)
    for layer in range(model.num_layers):
        resident = request.resident[layer]
        heads = torch.arange(resident.shape[0], device="cuda")[:, None].expand_as(resident)
        slots = request.slots[base + torch.arange(resident.shape[1], device="cuda")].expand_as(resident)
        host = request.host.keys[layer].cuda()
        assert torch.equal(pool.keys[layer][heads, slots], host[heads, resident])
    assert request.stats.copied > 0 and 0 <= request.stats.hit_rate <= 1
    assert request.lowbit.length == (length + steps) // settings.group * settings.group
    # positions 3968-4031: quantised in decode at groups of 64, partly so at groups of 32
    keys = request.host.keys[0, :, 3968:4032].cuda()
    assert_codes_agree(keys, settings.bits, settings.group, request.lowbit.codes[0, :, 3968:4032],
                       quantize_reference(keys, settings.bits, settings.group))


@pytest.mark.parametrize("settings", [
    SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_fraction=0.1, bits=2),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, selected_share=0.25),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, select_every=4),
    SpeCacheSettings.eightfold(enabled=True, min_context_tokens=1, speculate=True),
], ids=["2-bit-group-32", "eightfold-1-bit-group-64", "eightfold-selecting-a-quarter", "eightfold-selecting-every-4",
        "eightfold-speculating"])
def test_the_captured_steady_step_equals_the_eager_step(model, settings) -> None:
    length, steps = 3000, 130  # groups of low-bit keys are completed on the way (at 3008, 3040, 3072, ...)
    with torch.inference_mode():
        first, cache = prefill(model, length, steps + 1)
        budget = settings.budget(length)
        decoders, pools = [], []
        for graphs in (False, True):
            allocator = BlockAllocator(blocks_for(budget.tokens) + 1, 1)
            pools.append(PagedKVPool(model, allocator.num_blocks, 1, blocks_for(budget.tokens)))
            decoders.append(SpeCacheDecoder(model, pools[-1], settings, graphs=graphs))
            decoders[-1].admit(0, allocator.allocate(0, budget.tokens), cache, steps + 1)
        token = first
        for step in range(steps):
            eager, graphed = [d.decode(d.batch([0], [token]))[0].clone() for d in decoders]
            torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=1e-3, msg=f"step {step}")
            token = int(eager.argmax())
        torch.cuda.synchronize()
    # captured on the first step (and, selecting every 4, on the first reading one; speculating, on the first
    # step with a failed guess and on the first with a confirmed one, after the first step kicked off eagerly)
    graphs = len(decoders[1].graphs)
    assert decoders[0].graphs is None and (graphs in (1, 2) if settings.speculate else
                                           graphs == (1 if settings.select_every == 1 else 2))
    eager, graphed = (d.requests[0] for d in decoders)
    assert torch.equal(graphed.resident, eager.resident)
    top_k = budget.top_k_slots
    for layer in range(model.num_layers):  # the pool slots the tables name hold the same pairs
        slots = eager.slots[top_k]
        assert torch.equal(pools[1].keys[layer][:, graphed.slots[top_k]], pools[0].keys[layer][:, slots])
        assert torch.equal(pools[1].values[layer][:, graphed.slots[top_k]], pools[0].values[layer][:, slots])
    assert graphed.stats == eager.stats and graphed.length == eager.length == length + steps
    assert (graphed.guessed, graphed.confirmed) == (eager.guessed, eager.confirmed)
    assert torch.equal(graphed.host.keys[:, :, : length + steps], eager.host.keys[:, :, : length + steps])
    assert graphed.lowbit.length == eager.lowbit.length
    assert torch.equal(graphed.lowbit.codes, eager.lowbit.codes)
