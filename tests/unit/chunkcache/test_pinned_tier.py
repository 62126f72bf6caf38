"""The CPU tier's pinned memory (chunkcache/tiers.py): the block PyTorch's caching host allocator gives a tensor,
the bytes a chunk's keys take (a 512-token chunk of Llama-3-8B: 32 layers x 8 KV heads x 128 x 2 bytes, 32 MiB),
and what a tier does without a GPU. On the GPU, tests/gpu/test_cuda_blend.py checks that a reserved tier takes
demoted entries without pinning new memory."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.blend import precompute_chunk
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.tiers import MemoryTier, chunk_tensor_bytes, pinned_block_bytes
from hypothesis import given
from hypothesis import strategies as st
from support import tiny_llama


@pytest.mark.parametrize(("nbytes", "block"), [(0, 0), (1, 1), (2, 2), (3, 4), (32 << 20, 32 << 20),
                                               ((32 << 20) + 1, 64 << 20)])
def test_a_tensor_takes_the_next_power_of_two(nbytes: int, block: int) -> None:
    assert pinned_block_bytes(nbytes) == block


@given(st.integers(min_value=1, max_value=1 << 40))
def test_the_block_is_the_smallest_power_of_two_that_holds_the_tensor(nbytes: int) -> None:
    block = pinned_block_bytes(nbytes)
    assert block & (block - 1) == 0 and nbytes <= block < 2 * nbytes


@pytest.mark.parametrize("heads", [(4, 2), (8, 2)])  # head_dim 16 and 8 (hidden 64 over the heads)
def test_a_chunks_keys_take_what_the_model_computes_for_them(heads: tuple[int, int]) -> None:
    model = tiny_llama(layers=3, heads=heads[0], kv_heads=heads[1])
    kv = precompute_chunk(model, list(range(10, 47)), [1, 2, 3])
    assert chunk_tensor_bytes(model, 37) == kv.keys.nbytes == kv.values.nbytes
    assert chunk_tensor_bytes(model, 0) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_without_a_gpu_a_cpu_tier_is_not_pinned_and_counts_plain_bytes() -> None:
    tier = MemoryTier("cpu", 1 << 20, "cpu")
    assert not tier.pinned and tier.reserve(32 << 20) == 0 and tier.reserve(1000) == 0 and tier.reserved_bytes == 0
    entry = ChunkKV(torch.arange(3), torch.randn(2, 1, 3, 5), torch.randn(2, 1, 3, 5))  # 120-byte tensors
    assert tier.write(ChunkKey.of("m", [], [1]), entry) == entry.nbytes


def test_the_pinning_reservation_is_a_plugin_setting(monkeypatch) -> None:
    from blendgate.retriever.defaults import CHUNK_TOKENS
    from blendgate.sglang_plugin.settings import PluginSettings

    assert PluginSettings().cpu_cache_pin_tokens == CHUNK_TOKENS  # the gateway's chunk size
    monkeypatch.setenv("BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS", "0")
    assert PluginSettings.from_env().cpu_cache_pin_tokens == 0
    monkeypatch.setenv("BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS", "-1")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS"):
        PluginSettings.from_env()
