"""Sensitivity-weighted bins (issue 21): the keys' channel weights measured from a chunk's queries
(chunkcache/channel_weights.py, precompute_chunk), carried by ChunkKV through the memory tier to the cachegen
encoder, which narrows the bins of heavy channels and widens the others' at about equal bytes; entries keep their
format (the decoder reads them as before), damaged ones are refused as before."""

from __future__ import annotations

import math

import pytest
import torch
from blendgate.chunkcache.blend import precompute_chunk
from blendgate.chunkcache.channel_weights import key_weights
from blendgate.chunkcache.codec import Codec, KVLayout, kv_codec
from blendgate.chunkcache.codec.cachegen import MAX_BIN_SCALE, bin_scales
from blendgate.chunkcache.kv import ChannelWeights, ChunkKV
from blendgate.chunkcache.tiers import MemoryTier
from blendgate.engine.llama import LlamaFamilyModel
from hypothesis import given, settings
from hypothesis import strategies as st
from support import tiny_llama
from test_codec import (
    assert_round_trip_is_decode_of_encode,
    key_of,
    kv_like,
    stored_bound,
    with_outliers,
)


def heavy_weights(layers: int, heads: int, dim: int, seed: int, zeros: int = 0) -> ChannelWeights:
    """Log-normal weights spread over orders of magnitude (real keys' outlier channels), `zeros` of them 0."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.exp(2.0 * torch.randn(layers, heads, dim, generator=generator)).flatten()
    weights[torch.randperm(weights.numel(), generator=generator)[:zeros]] = 0.0
    return ChannelWeights(weights.reshape(layers, heads, dim))


def weighted(kv: ChunkKV, weights: ChannelWeights | None) -> ChunkKV:
    return ChunkKV(kv.token_ids, kv.keys, kv.values, weights)


def test_bin_scales_keep_each_layers_mean_log_and_follow_the_square_root_of_the_weights() -> None:
    weights = heavy_weights(4, 3, 16, seed=0, zeros=5).keys
    scales = bin_scales(weights).reshape(4, -1)
    assert scales.min() >= 1 / MAX_BIN_SCALE - 1e-6 and scales.max() <= MAX_BIN_SCALE + 1e-5
    assert scales.log().mean(dim=1).abs().max() < 0.03
    flat = weights.reshape(4, -1)
    inside = (scales > 1 / MAX_BIN_SCALE * 1.001) & (scales < MAX_BIN_SCALE * 0.999)
    for layer in range(4):  # unclamped channels: bins in proportion to sqrt(weight) within a layer
        ratio = scales[layer][inside[layer]] / flat[layer][inside[layer]].sqrt()
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-4, atol=0)
    order = flat[0].argsort()
    assert (scales[0][order].diff() >= 0).all()  # heavier channels never get fewer bins
    assert torch.equal(bin_scales(torch.ones(2, 2, 8)), torch.ones(32))
    assert torch.equal(bin_scales(torch.zeros(2, 2, 8)), torch.ones(32))


def test_weighted_keys_take_narrower_bins_where_heavy_and_wider_elsewhere_at_about_equal_bytes() -> None:
    """SmolLM2-135M's KV shape, fixed seed: against the same entry without weights, channels weighing more than
    their layer's geometric mean get narrower bins, the others wider; values are unchanged; the entry is within
    5% of the unweighted one's size, every value within its stored bins, and the weighted squared error smaller."""
    kv = kv_like(11, layers=30, heads=3, tokens=121, dim=64, dtype=torch.bfloat16)
    weights = heavy_weights(30, 3, 64, seed=12)
    codec = Codec("cachegen", 0)
    plain_data, weighted_data = codec.encode(key_of(kv), kv), codec.encode(key_of(kv), weighted(kv, weights))
    assert abs(len(weighted_data) / len(plain_data) - 1) < 0.05
    layout = KVLayout.of(kv.keys)
    plain_bins, weighted_bins = (stored_bound(data, "keys", layout)[:, :, 0] for data in (plain_data, weighted_data))
    log_weights = weights.keys.log()
    heavy = log_weights > log_weights.mean(dim=(1, 2), keepdim=True) + 1.0  # a factor e above the mean
    light = log_weights < log_weights.mean(dim=(1, 2), keepdim=True) - 1.0
    assert (weighted_bins[heavy] < plain_bins[heavy]).float().mean() > 0.95
    assert (weighted_bins[light] > plain_bins[light]).float().mean() > 0.95
    assert torch.equal(stored_bound(weighted_data, "values", layout), stored_bound(plain_data, "values", layout))
    decoded = codec.decode(key_of(kv), weighted_data)
    plain = codec.decode(key_of(kv), plain_data)
    assert decoded is not None and plain is not None
    error = (decoded.keys.float() - kv.keys.float()).abs()
    rounding = decoded.keys.float().abs().maximum(kv.keys.float().abs()) * torch.finfo(torch.bfloat16).eps
    assert (error <= stored_bound(weighted_data, "keys", layout) * 1.0001 + rounding).all()
    assert torch.equal(decoded.values, plain.values)

    def weighted_error(got: torch.Tensor) -> float:
        return float(((got.float() - kv.keys.float()).square() * weights.keys[:, :, None]).sum())

    assert weighted_error(decoded.keys) < 0.7 * weighted_error(plain.keys)


def test_damaged_weighted_entries_are_refused_and_bad_weights_are_errors() -> None:
    kv = weighted(kv_like(13), heavy_weights(6, 2, 16, seed=14))
    codec = Codec("cachegen", 0)
    data = codec.encode(key_of(kv), kv)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x01
    assert codec.decode(key_of(kv), data) is not None and codec.decode(key_of(kv), bytes(damaged)) is None
    assert Codec("cachegen", 1).decode(key_of(kv), data) is None
    wrong = weighted(kv, ChannelWeights(torch.ones(6, 2, 8)))
    with pytest.raises(ValueError, match="do not fit"):
        codec.encode(key_of(kv), wrong)
    with pytest.raises(ValueError, match="do not fit"):
        codec.round_trip(wrong)
    # The other codecs take the weights and ignore them.
    for name in ("raw", "int4"):
        for kind, tensor in (("keys", kv.keys), ("values", kv.values)):
            other = kv_codec(name)
            with_weights, without = other.encode(tensor, kind, kv.weights), other.encode(tensor, kind)
            assert with_weights.keys() == without.keys()
            assert all(torch.equal(with_weights[part], without[part]) for part in without)


@settings(max_examples=25, deadline=None)
@given(level=st.integers(0, 3), layers=st.integers(1, 5), heads=st.integers(1, 3), tokens=st.integers(1, 25),
       dim=st.integers(1, 9), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
       seed=st.integers(0, 1000), zeros=st.integers(0, 4), outliers=st.integers(0, 3))
def test_the_weighted_round_trip_is_decode_of_encode(level, layers, heads, tokens, dim, dtype, seed, zeros,
                                                     outliers) -> None:
    base = kv_like(seed, layers, heads, tokens, dim)
    keys = with_outliers(base.keys.to(dtype), seed, outliers, 50.0)
    weights = heavy_weights(layers, heads, dim, seed + 1, zeros=min(zeros, layers * heads * dim))
    assert_round_trip_is_decode_of_encode("cachegen", level, ChunkKV(base.token_ids, keys, base.values.to(dtype),
                                                                     weights))


def test_key_weights_are_the_rope_pairs_query_energy_averaged_over_each_kv_heads_queries() -> None:
    heads, kv_heads, tokens, dim = 4, 2, 3, 4
    queries = torch.zeros(heads, tokens, dim)
    queries[0, :, 0] = 2.0  # KV head 0 (query heads 0, 1): channel 0's pair is (0, 2)
    queries[1, 0, 3] = 3.0  # one token of three: channel 3's pair is (1, 3)
    queries[3, :, 1] = 1.0  # KV head 1 (query heads 2, 3)
    weights = key_weights([queries, 2 * queries], kv_heads).keys
    expected = torch.tensor([[[2.0, 1.5, 2.0, 1.5], [0.0, 0.5, 0.0, 0.5]]])
    torch.testing.assert_close(weights, torch.cat([expected, 4 * expected]))
    with pytest.raises(ValueError):
        key_weights([queries], 3)
    with pytest.raises(ValueError):
        key_weights([], 2)


@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return tiny_llama(layers=3, seed=5)


def test_precompute_chunk_measures_the_chunks_own_queries_and_the_memory_tier_keeps_them(model) -> None:
    prefix, chunk = list(range(3, 10)), list(range(40, 52))
    assert precompute_chunk(model, chunk, prefix).weights is None  # only where a tier's codec uses them
    kv = precompute_chunk(model, chunk, prefix, channel_weights=True)
    assert kv.weights is not None and kv.weights.keys.shape == (3, 2, model.head_dim)
    # Layer 0's queries depend on the token only: the chunk's own, the prefix's left out.
    hidden = torch.nn.functional.embedding(torch.tensor(chunk), model.embed_tokens)
    queries, _, _ = model.split_qkv(model.project_qkv(0, hidden))
    torch.testing.assert_close(kv.weights.keys[0], key_weights([queries], 2).keys[0])
    cache = model.new_cache(len(prefix))
    model.forward(torch.tensor(prefix), None, cache)
    continued = precompute_chunk(model, chunk, prefix, cache, channel_weights=True)  # prefix computed already
    torch.testing.assert_close(continued.weights.keys, kv.weights.keys, rtol=1e-4, atol=1e-6)
    tier = MemoryTier("memory", 1 << 30, "cpu")
    tier.write(key_of(kv), kv)
    assert torch.equal(tier.read(key_of(kv)).weights.keys, kv.weights.keys)
    assert math.isclose(kv.nbytes - ChunkKV(kv.token_ids, kv.keys, kv.values).nbytes, kv.weights.keys.nbytes)


def test_a_blender_measures_the_weights_where_a_tier_encodes_with_them(model, tmp_path) -> None:
    from blendgate.chunkcache.codec import Codec
    from blendgate.chunkcache.kv_store import ChunkCacheStore
    from blendgate.chunkcache.runner import ChunkBlender
    from blendgate.chunkcache.tiers import DiskTier

    def blender(codec: str, **options) -> ChunkBlender:
        tiers = [MemoryTier("memory", 1 << 30, "cpu"), DiskTier("disk", 1 << 30, tmp_path / codec, Codec(codec, 0))]
        return ChunkBlender(model, ChunkCacheStore(tiers), **options)

    chunk = list(range(40, 52))
    measured, plain = blender("cachegen"), blender("raw")
    assert measured.channel_weights and not plain.channel_weights
    kv, _ = measured.chunk_kv(measured.chunk_key((), tuple(chunk)), tuple(chunk), ())
    assert kv.weights is not None
    kv, _ = plain.chunk_kv(plain.chunk_key((), tuple(chunk)), tuple(chunk), ())
    assert kv.weights is None
    assert blender("raw", channel_weights=True).channel_weights  # asked for (the benchmarks' codec rows)
