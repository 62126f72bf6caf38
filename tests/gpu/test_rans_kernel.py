"""The cachegen codec's Triton decoder (kernels/rans.py) on CUDA against the reference (numpy rANS decoding,
torch dequantisation), on Llama-3-8B's and SmolLM2-135M's KV shapes with synthetic KV (per-channel offsets and
scales, keys a random walk along the tokens); damaged streams refused on the GPU too; the framing decoding onto
the GPU as the tiers do."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from blendgate.chunkcache.codec import Codec
from blendgate.chunkcache.codec.cachegen import GROUP_TOKENS, CacheGenCodec, layer_groups
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.tiers import DiskTier
from blendgate.kernels import rans

sys.path.append(str(Path(__file__).resolve().parent.parent))  # tests/: bench_modules (this folder runs alone)
from bench_modules import bench_module  # noqa: E402

synthetic_kv = bench_module("codec.py").synthetic_kv  # the benchmark's synthetic KV, the same values

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (layers, KV heads, tokens, head_dim)
LLAMA3_8B = (32, 8, 512, 128)
SMOLLM2_135M = (30, 3, 121, 64)


def groups_of(parts, shape, device) -> list[rans.GroupStreams]:
    layers, heads, _, dim = shape
    return [CacheGenCodec._group(parts, group, len(layer_range), heads * dim, torch.device(device))
            for group, layer_range in enumerate(layer_groups(layers))]


@pytest.mark.parametrize("shape", [LLAMA3_8B, SMOLLM2_135M, (4, 2, 1, 64), (3, 1, 13, 9)])
@pytest.mark.parametrize("level", [0, 3])
def test_the_kernel_matches_the_reference(shape, level) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    layers, heads, tokens, dim = shape
    for tensor, kind in zip(synthetic_kv(shape, seed), ("keys", "values")):
        parts = CacheGenCodec(level).encode(tensor, kind)
        expected = rans.decode_reference(groups_of(parts, shape, "cpu"), heads, tokens, dim, GROUP_TOKENS,
                                         torch.bfloat16, torch.device("cpu"))
        got = rans.decode(groups_of(parts, shape, "cuda"), heads, tokens, dim, GROUP_TOKENS, torch.bfloat16,
                          torch.device("cuda"))
        assert got.is_cuda and got.shape == shape and got.dtype == torch.bfloat16
        # One bf16 rounding apart at most (the kernel may fuse a multiply and add that the reference rounds twice).
        assert torch.allclose(got.cpu().float(), expected.float(), rtol=2 ** -7, atol=1e-6)


def test_damaged_streams_are_refused_on_the_gpu() -> None:
    shape = SMOLLM2_135M
    keys, _ = synthetic_kv(shape, 1)
    parts = CacheGenCodec(1).encode(keys, "keys")
    groups = groups_of(parts, shape, "cuda")
    words = groups[1].words.clone()
    words[words.shape[0] // 2] ^= 0x0100
    states = groups[0].states.clone()
    states[3] ^= 1 << 20
    shapes = groups[2].shapes.clone()
    shapes[1, 7] = 200  # not a shape of the family
    offsets = groups[0].offsets.clone()
    offsets[4] = 1 << 30  # past the words
    for damaged in ([groups[0], replace(groups[1], words=words), groups[2]],
                    [groups[0], replace(groups[1], words=groups[1].words[:-2]), groups[2]],
                    [replace(groups[0], states=states), *groups[1:]],
                    [*groups[:2], replace(groups[2], shapes=shapes)],
                    [replace(groups[0], offsets=offsets), *groups[1:]]):
        with pytest.raises(ValueError, match="damaged"):
            rans.decode(damaged, shape[1], shape[2], shape[3], GROUP_TOKENS, torch.bfloat16, torch.device("cuda"))


def test_the_framing_decodes_onto_the_gpu_as_on_the_host() -> None:
    keys, values = synthetic_kv(SMOLLM2_135M, 2)
    kv = ChunkKV(torch.arange(SMOLLM2_135M[2]), keys, values)
    key = ChunkKey.of("m", [1], kv.token_ids.tolist())
    codec = Codec("cachegen", 2)
    data = codec.encode(key, kv)
    host, gpu = codec.decode(key, data), codec.decode(key, data, device="cuda")
    assert gpu.keys.is_cuda and gpu.values.is_cuda and gpu.token_ids.device.type == "cpu"
    for got, expected in ((gpu.keys, host.keys), (gpu.values, host.values)):
        assert torch.allclose(got.cpu().float(), expected.float(), rtol=2 ** -7, atol=1e-6)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    assert codec.decode(key, bytes(flipped), device="cuda") is None


def test_the_disk_tier_decodes_cachegen_entries_on_the_gpu(tmp_path) -> None:
    keys, values = synthetic_kv(SMOLLM2_135M, 3)
    kv = ChunkKV(torch.arange(SMOLLM2_135M[2]), keys, values)
    key = ChunkKey.of("m", [1], kv.token_ids.tolist())
    tier = DiskTier("disk", 1 << 30, tmp_path, Codec("cachegen", 1), device="cuda")
    tier.write(key, kv)
    on_gpu = tier.read(key)
    on_host = DiskTier("disk", 1 << 30, tmp_path, Codec("cachegen", 1)).read(key)
    assert on_gpu.keys.is_cuda and not on_host.keys.is_cuda
    assert torch.allclose(on_gpu.values.cpu().float(), on_host.values.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("level", range(4))
def test_the_round_trip_without_the_entry_is_the_gpu_decoders(level) -> None:
    """bench/quality.py's codec rows on CUDA blend from Codec.round_trip onto the GPU (dequantised on the host,
    as the reference does): the same bits as the Triton decoder gives for the entry, if the kernel keeps the
    reference's roundings (enable_fp_fusion=False: a product, then a sum)."""
    keys, values = synthetic_kv(SMOLLM2_135M, 10 + level)
    kv = ChunkKV(torch.arange(SMOLLM2_135M[2]), keys, values)
    key = ChunkKey.of("m", [1], kv.token_ids.tolist())
    codec = Codec("cachegen", level)
    decoded, fast = codec.decode(key, codec.encode(key, kv), device="cuda"), codec.round_trip(kv, "cuda")
    for got, expected in ((fast.keys, decoded.keys), (fast.values, decoded.values)):
        assert got.is_cuda and got.dtype == expected.dtype
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
