"""The CPU tier's pinned memory (chunkcache/tiers.py): the block PyTorch's caching host allocator gives a tensor,
the bytes a chunk's keys take, and what a tier does without a GPU. On the GPU, tests/gpu/test_cuda_blend.py
checks that a reserved tier takes demoted entries without pinning new memory."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.tiers import MemoryTier, chunk_tensor_bytes, pinned_block_bytes
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig


@pytest.mark.parametrize(("nbytes", "block"), [(0, 0), (1, 1), (2, 2), (3, 4), (32 << 20, 32 << 20),
                                               ((32 << 20) + 1, 64 << 20)])
def test_a_tensor_takes_the_next_power_of_two(nbytes: int, block: int) -> None:
    assert pinned_block_bytes(nbytes) == block


@given(st.integers(min_value=1, max_value=1 << 40))
def test_the_block_is_the_smallest_power_of_two_that_holds_the_tensor(nbytes: int) -> None:
    block = pinned_block_bytes(nbytes)
    assert block & (block - 1) == 0 and nbytes <= block < 2 * nbytes


def test_a_chunks_keys_take_layers_times_kv_heads_times_tokens_times_head_dim() -> None:
    # Llama-3-8B's shapes: 32 layers, 8 KV heads of 128; a 512-token chunk's bf16 keys take 32 MiB (and its values
    # as much): one pinned block each, no rounding.
    llama = AutoConfig.for_model("llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 hidden_size=4096)
    assert chunk_tensor_bytes(llama, 512, 2) == 32 << 20 == pinned_block_bytes(32 << 20)
    explicit = AutoConfig.for_model("llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    hidden_size=64, head_dim=32)  # head_dim given, not hidden_size / heads
    assert chunk_tensor_bytes(explicit, 10, 4) == 2 * 2 * 10 * 32 * 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_without_a_gpu_a_cpu_tier_is_not_pinned_and_counts_plain_bytes() -> None:
    tier = MemoryTier("cpu", 1 << 20, "cpu")
    assert not tier.pinned and tier.reserve(32 << 20) == 0 and tier.reserve(1000) == 0
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
