"""blendgate.kernels on CUDA against their references, on fresh random inputs each run (the seed is printed)
with outputs poisoned first, so an unwritten element or a wrong index cannot pass."""

from __future__ import annotations

import os

import pytest
import torch
from blendgate.chunkcache.blend import blend_prefill, precompute_chunk
from blendgate.chunkcache.kv import ChunkKV
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.kernels import activation, attention, kv_copy, norm, probe_attention, rope, selection, sparse_attention
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return torch.Generator(device="cuda").manual_seed(seed)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,capacities,length", [((32, 8, 128), (5184, 4256), 4192), ((2, 3, 64), (10, 7000), 1),
                                                     ((1, 1, 16), (300, 300), 300), ((4, 2, 128), (64, 64), 0)])
def test_copy_slots_copies_exactly_the_first_slots(gen, dtype, shape, capacities, length) -> None:
    layers, heads, head_dim = shape
    src = torch.randn(layers, heads, capacities[0], head_dim, generator=gen, device="cuda").to(dtype)
    dst = torch.full((layers, heads, capacities[1], head_dim), float("nan"), dtype=dtype, device="cuda")
    kv_copy.copy_slots(src, dst, length)
    assert torch.equal(dst[:, :, :length], src[:, :, :length])
    assert dst[:, :, length:].isnan().all()  # nothing past the length written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first_layer", [0, 2])
def test_place_many_places_every_chunk_as_place_does(gen, dtype, first_layer) -> None:
    layers, heads, head_dim = 4, 8, 128
    lengths, starts, start = [512, 77, 1, 300], [], 64
    for length in lengths:
        starts.append(start)
        start += length + 3
    total = start + 10
    angles = torch.rand(total, head_dim // 2, generator=gen, device="cuda") * 100
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).contiguous()
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).contiguous()
    chunks = [(torch.randn(layers, heads, n, head_dim, generator=gen, device="cuda").to(dtype),
               torch.randn(layers, heads, n, head_dim, generator=gen, device="cuda").to(dtype), s)
              for n, s in zip(lengths, starts)]
    got = [torch.full((layers, heads, total, head_dim), float("nan"), dtype=dtype, device="cuda") for _ in range(2)]
    want = [tensor.clone() for tensor in got]
    cut = slice(first_layer, layers)
    rope.place_many([(k[cut], v[cut], s) for k, v, s in chunks], got[0][cut], got[1][cut], cos, sin)
    for k, v, s in chunks:
        span = slice(s, s + k.shape[2])
        rope.place(k[cut], v[cut], want[0][cut], want[1][cut], s, cos[span], sin[span])
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan())  # the same slots written, and only those
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_uploads_through_the_pinned_ring_arrive_whole(gen) -> None:
    from blendgate.engine.staging import RING, upload

    sent = [torch.randint(0, 1 << 40, (n,), dtype=torch.int64) for n in (5, 70_000, 3, *range(1, RING + 3))]
    arrived = [upload(host, torch.device("cuda")) for host in sent]  # more uploads than buffers: reuse waits
    for host, device_copy in zip(sent, arrived):
        assert torch.equal(device_copy.cpu(), host)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 512, 128), (4, 2, 77, 64), (32, 8, 33, 128)])
def test_place_rotates_and_writes_exactly_the_chunk_slots(gen, dtype, shape) -> None:
    layers, heads, tokens, head_dim = shape
    keys = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    values = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=gen, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    capacity, start = tokens + 300, 123
    cache = [torch.full((layers, heads, capacity, head_dim), float("nan"), dtype=dtype, device="cuda")
             for _ in range(4)]
    rope.place(keys, values, cache[0], cache[1], start, cos, sin)
    rope.place_reference(keys.double(), values.double(), cache[2].double(), cache[3].double(), start, cos.double(),
                         sin.double())
    expected_keys = rope.rotate(keys.double(), cos.double(), sin.double())
    span = slice(start, start + tokens)
    assert relative_error(cache[0][:, :, span], expected_keys) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(cache[1][:, :, span], values)
    outside = torch.cat([cache[0][:, :, :start], cache[0][:, :, span.stop:]], dim=2)
    assert outside.isnan().all(), "wrote outside the chunk's slots"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(710, 4096), (3, 576), (1, 3584)])
def test_rms_norm_matches_the_reference(gen, dtype, rows, hidden) -> None:
    x = (torch.randn(rows, hidden, generator=gen, device="cuda") * 3).to(dtype)
    weight = torch.randn(hidden, generator=gen, device="cuda").to(dtype)
    got = norm.rms_norm(x, weight, 1e-5)
    expected = norm.rms_norm_reference(x.double(), weight.double(), 1e-5)
    assert not got.isnan().any()
    assert relative_error(got, expected) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_deviation_matches_the_reference(gen) -> None:
    fresh = torch.randn(8, 4200, 128, generator=gen, device="cuda").to(torch.bfloat16)
    cached = torch.randn(8, 4200, 128, generator=gen, device="cuda").to(torch.bfloat16)
    score = selection.deviation(fresh, cached, out=torch.full((4200,), float("nan"), device="cuda"))
    expected = selection.deviation_reference(fresh, cached)
    assert not score.isnan().any() and relative_error(score, expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,queries,slots,head_dim", [(32, 8, 40, 4200, 128), (9, 3, 25, 1700, 64),
                                                                   (8, 8, 1, 129, 64), (28, 4, 70, 8300, 128)])
def test_attention_mass_matches_the_reference(gen, dtype, heads, kv_heads, queries, slots, head_dim) -> None:
    q = torch.randn(heads, queries, head_dim, generator=gen, device="cuda").to(dtype)
    keys = torch.randn(kv_heads, slots + 64, head_dim, generator=gen, device="cuda").to(dtype)  # spare capacity
    positions = torch.arange(slots - queries, slots, device="cuda")
    got = selection.attention_mass(q, keys, positions, slots)
    expected = selection.attention_mass_reference(q, keys, positions, slots)
    assert got.shape == (slots,) and not got.isnan().any()
    # Scores are rounded to the inputs' dtype before the float32 softmax (one fused, masked product).
    assert relative_error(got, expected) < (1e-4 if dtype == torch.float32 else 2e-2)
    assert abs(float(got.sum()) - heads * queries) < 1e-2 * heads * queries  # each query and head gives 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,rows,votes,slots,head_dim", [
    (32, 8, 64, 32, 4200, 128),  # Llama-3-8B's probe: markers and padding, then the question
    (9, 3, 25, 25, 1700, 64),  # every row votes; a group of 3
    (8, 8, 1, 1, 129, 64),  # one row
    (28, 4, 70, 0, 8300, 128),  # no voting rows: the output only
    (32, 8, 33, 17, 20000, 128)])  # long prompt: many splits
def test_probe_attention_matches_the_reference(gen, dtype, heads, kv_heads, rows, votes, slots, head_dim) -> None:
    q = torch.randn(heads, rows, head_dim, generator=gen, device="cuda").to(dtype)
    keys = torch.randn(kv_heads, slots + 64, head_dim, generator=gen, device="cuda").to(dtype)  # spare capacity
    values = torch.randn(kv_heads, slots + 64, head_dim, generator=gen, device="cuda").to(dtype)
    # Rows at scattered positions (markers between chunks, the question at the end), three at position 0.
    positions = torch.sort(torch.randint(0, slots, (rows,), generator=gen, device="cuda")).values
    positions[: min(3, rows)] = 0
    positions[rows - votes:] = torch.arange(slots - votes, slots, device="cuda")
    weights = torch.rand(rows, generator=gen, device="cuda")
    first_vote = rows - votes
    before = torch.rand(slots, generator=gen, device="cuda")  # the mass is added into what is there
    mass = before.clone()
    # The output as the probe keeps it: rows of [heads * head_dim], read as [heads, rows, head_dim].
    out = torch.full((rows, heads * head_dim), float("nan"), device="cuda", dtype=dtype)
    view = out.view(rows, heads, head_dim).transpose(0, 1)
    got = probe_attention.probe_attention(q, keys, values, positions, weights, first_vote, slots, mass, out=view)
    expected_out, expected_mass = probe_attention.probe_attention_reference(q, keys, values, positions, weights,
                                                                            first_vote, slots)
    assert got.data_ptr() == view.data_ptr() and not out.isnan().any()
    assert relative_error(view, expected_out) < 1e-2
    assert relative_error(mass - before, expected_mass) < 1e-2 if votes else torch.equal(mass, before)
    if votes:  # each voting row and head gives its weight in all
        assert abs(float((mass - before).sum()) - heads * float(weights[first_vote:].sum())) < 1e-2 * heads * votes


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("queries,slots,shuffled", [(650, 4200, False), (37, 300, True), (1, 129, False),
                                                    (1000, 1000, False)])
def test_masked_attention_matches_the_reference(gen, backend, queries, slots, shuffled) -> None:
    q = torch.randn(32, queries, 128, generator=gen, device="cuda").to(torch.bfloat16)
    keys = torch.randn(8, slots, 128, generator=gen, device="cuda").to(torch.bfloat16)
    values = torch.randn(8, slots, 128, generator=gen, device="cuda").to(torch.bfloat16)
    slot_positions = torch.arange(slots, device="cuda")
    if shuffled:  # slots need not be in position order
        slot_positions = slot_positions[torch.randperm(slots, generator=gen, device="cuda")]
    query_positions = torch.randperm(slots, generator=gen, device="cuda")[:queries].sort().values
    plan = attention.plan_masked(query_positions, slot_positions, backend)
    got = attention.attend(q, keys, values, plan)
    expected = attention.reference_attention(q, keys, values, query_positions, slot_positions)
    assert not got.isnan().any()
    assert relative_error(got, expected) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("queries,slots,head_dim,sort", [(710, 4192, 128, True), (37, 300, 64, False),
                                                         (1, 129, 128, True), (3616, 4192, 128, True)])
def test_sparse_attention_matches_the_reference(gen, dtype, queries, slots, head_dim, sort) -> None:
    q = torch.randn(32, queries, head_dim, generator=gen, device="cuda").to(dtype)
    keys = torch.randn(8, slots + 64, head_dim, generator=gen, device="cuda").to(dtype)
    values = torch.randn(8, slots + 64, head_dim, generator=gen, device="cuda").to(dtype)
    keys[:, slots:], values[:, slots:] = float("nan"), float("nan")  # past the valid slots: never read
    query_positions = torch.randperm(slots, generator=gen, device="cuda")[:queries]
    if sort:
        query_positions = query_positions.sort().values
    plan = attention.plan_sparse(query_positions, slots)
    assert plan.kind == "sparse"
    got = attention.attend(q, keys, values, plan)
    expected = attention.reference_attention(q, keys[:, :slots], values[:, :slots], query_positions,
                                             torch.arange(slots, device="cuda"))
    assert not got.isnan().any()
    assert relative_error(got, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype != torch.float32:  # both Triton kernels themselves, into poisoned buffers
        blocked = torch.full_like(q, float("nan"))
        sparse_attention.sparse_causal_attention(q, keys, values, query_positions, plan.block_ends, out=blocked)
        grouped = torch.full_like(q, float("nan"))
        probe_attention.grouped_causal_attention(q, keys[:, :slots], values[:, :slots], query_positions, out=grouped)
        for out in (blocked, grouped):
            assert not out.isnan().any() and relative_error(out, expected) < 1e-2


@pytest.mark.parametrize("kind", ["causal", "all"])
def test_dense_attention_matches_the_reference(gen, kind) -> None:
    slots = 2048
    queries = slots if kind == "causal" else 1
    q = torch.randn(32, queries, 128, generator=gen, device="cuda").to(torch.bfloat16)
    keys = torch.randn(8, slots + 100, 128, generator=gen, device="cuda").to(torch.bfloat16)
    values = torch.randn(8, slots + 100, 128, generator=gen, device="cuda").to(torch.bfloat16)
    keys[:, slots:] = float("nan")  # beyond the valid slots: must never be read
    plan = attention.plan_causal(slots) if kind == "causal" else attention.plan_all(slots)
    positions = torch.arange(slots, device="cuda")
    query_positions = positions if kind == "causal" else positions[-1:]
    expected = attention.reference_attention(q, keys[:, :slots], values[:, :slots], query_positions, positions)
    assert relative_error(attention.attend(q, keys, values, plan), expected) < 1e-2



@pytest.mark.parametrize("ratio", [0.0, 0.15, 1.0])
def test_chunks_streamed_from_cpu_memory_blend_like_chunks_on_the_gpu(gen, ratio) -> None:
    model = LlamaFamilyModel.random(tiny_config(max_positions=4096), device="cuda", dtype=torch.bfloat16, seed=5)
    ids = torch.randint(0, 512, (4 * 128 + 40,), generator=gen, device="cuda").tolist()
    prefix, chunks, question = ids[:24], [ids[24 + 128 * i: 24 + 128 * (i + 1)] for i in range(4)], ids[-16:]
    on_gpu = [precompute_chunk(model, c, prefix) for c in chunks]
    in_cpu = [ChunkKV(c.token_ids.cpu(), c.keys.cpu().pin_memory(), c.values.cpu().pin_memory()) for c in on_gpu]
    expected = blend_prefill(model, [prefix, *on_gpu, question], ratio)
    got = blend_prefill(model, [prefix, *in_cpu, question], ratio)
    torch.testing.assert_close(got.logits, expected.logits, atol=0, rtol=0)
    length = len(ids)
    torch.testing.assert_close(got.cache.keys[:, :, :length], expected.cache.keys[:, :, :length], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,tokens", [(32, 8, 128, 650), (9, 3, 64, 1), (28, 4, 128, 77)])
def test_rope_store_rotates_queries_and_writes_exactly_the_given_slots(gen, dtype, heads, kv_heads, head_dim,
                                                                        tokens) -> None:
    width = (heads + 2 * kv_heads) * head_dim
    # A row-sliced view, as blending's selected rows are: the row stride is the kernel's to respect.
    qkv = torch.randn(tokens, width + 64, generator=gen, device="cuda").to(dtype)[:, :width]
    angles = torch.rand(tokens, head_dim // 2, generator=gen, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    capacity = tokens + 500
    slots = torch.randperm(capacity, generator=gen, device="cuda")[:tokens]
    layer_keys = torch.full((2, kv_heads, capacity, head_dim), float("nan"), dtype=dtype, device="cuda")
    layer_values = torch.full_like(layer_keys, float("nan"))
    q = rope.rope_store(qkv, heads, cos, sin, layer_keys[1], layer_values[1], slots)
    expected_keys = torch.zeros(kv_heads, capacity, head_dim, dtype=torch.float64, device="cuda")
    expected_values = torch.zeros_like(expected_keys)
    expected_q = rope.rope_store_reference(qkv.double(), heads, cos.double(), sin.double(), expected_keys,
                                           expected_values, slots)
    tolerance = 1e-6 if dtype == torch.float32 else 8e-3
    assert q.shape == (heads, tokens, head_dim) and relative_error(q, expected_q) < tolerance
    assert relative_error(layer_keys[1][:, slots], expected_keys[:, slots]) < tolerance
    assert torch.equal(layer_values[1][:, slots].double(), expected_values[:, slots])
    untouched = torch.ones(capacity, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert layer_keys[1][:, untouched].isnan().all() and layer_values[1][:, untouched].isnan().all()
    assert layer_keys[0].isnan().all(), "wrote into another layer"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(650, 14336), (1, 1536), (33, 18944)])
def test_silu_and_mul_matches_the_reference(gen, dtype, rows, inter) -> None:
    gate_up = (torch.randn(rows, 2 * inter, generator=gen, device="cuda") * 3).to(dtype)
    got = activation.silu_and_mul(gate_up)
    expected = activation.silu_and_mul_reference(gate_up.double())
    assert got.shape == (rows, inter) and not got.isnan().any()
    assert relative_error(got, expected) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,recomputed,stale,chunks", [(32, 8, 128, 608, 3500, 8),
                                                                             (9, 3, 64, 5, 40, 3),
                                                                             (8, 8, 64, 1, 1, 1)])
def test_drift_kernels_match_their_references(gen, dtype, heads, kv_heads, head_dim, recomputed, stale,
                                              chunks) -> None:
    from blendgate.kernels import drift

    capacity, active = 4400, recomputed + 30
    qkv = torch.randn(active, (heads + 2 * kv_heads) * head_dim, generator=gen, device="cuda").to(dtype)
    keys = torch.randn(kv_heads, capacity, head_dim, generator=gen, device="cuda").to(dtype)
    values = torch.randn(kv_heads, capacity, head_dim, generator=gen, device="cuda").to(dtype)
    angles = torch.rand(capacity, head_dim // 2, generator=gen, device="cuda") * 100
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    order = torch.randperm(capacity, generator=gen, device="cuda")
    slots, stale_slots = order[:recomputed].sort().values, order[recomputed: recomputed + stale]
    rows = torch.randperm(active, generator=gen, device="cuda")[:recomputed]
    got = drift.drift_deltas(qkv, rows, heads, keys, values, slots, cos, sin)
    expected = drift.drift_deltas_reference(qkv.double(), rows, heads, keys.double(), values.double(), slots,
                                            cos.double(), sin.double())
    assert got.shape == (recomputed, 2 * kv_heads, head_dim) and not got.isnan().any()
    assert relative_error(got, expected) < (1e-5 if dtype == torch.float32 else 1e-2)

    mean = torch.randn(chunks, 2 * kv_heads, head_dim, generator=gen, device="cuda")
    chunk_of = torch.randint(0, chunks, (stale,), generator=gen, device="cuda")
    shifted_keys, shifted_values = keys.clone(), values.clone()
    drift.drift_apply(mean, chunk_of, stale_slots, 0.5, shifted_keys, shifted_values, cos, sin)
    reference_keys, reference_values = keys.double(), values.double()
    drift.drift_apply_reference(mean.double(), chunk_of, stale_slots, 0.5, reference_keys, reference_values,
                                cos.double(), sin.double())
    assert relative_error(shifted_keys, reference_keys) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert relative_error(shifted_values, reference_values) < (1e-6 if dtype == torch.float32 else 8e-3)
    untouched = torch.ones(capacity, dtype=torch.bool, device="cuda")
    untouched[stale_slots] = False
    assert torch.equal(shifted_keys[:, untouched], keys[:, untouched]), "wrote outside the stale slots"
