"""Sensitivity-weighted cachegen bins on CUDA: a chunk computed on the GPU carries its keys' channel weights there
(precompute_chunk), the encoder takes them from the GPU, and the weighted entry decodes on the GPU (the Triton
kernel) as on the host and as the fast round trip gives."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.blend import precompute_chunk
from blendgate.chunkcache.codec import Codec
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.engine.llama import LlamaFamilyModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("level", [0, 1])
def test_a_gpu_chunks_weighted_entry_decodes_on_the_gpu_as_on_the_host(level: int) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=200, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=1024)
    model = LlamaFamilyModel.random(config, device="cuda", dtype=torch.bfloat16, seed=7)
    chunk = precompute_chunk(model, list(range(10, 90)), list(range(3, 9)), channel_weights=True)
    assert chunk.weights is not None and chunk.weights.keys.is_cuda
    key = ChunkKey.of("m", list(range(3, 9)), chunk.token_ids.tolist())
    codec = Codec("cachegen", level)
    data = codec.encode(key, chunk)
    unweighted = codec.encode(key, ChunkKV(chunk.token_ids, chunk.keys, chunk.values))
    assert abs(len(data) / len(unweighted) - 1) < 0.05
    host, gpu = codec.decode(key, data), codec.decode(key, data, device="cuda")
    fast = codec.round_trip(chunk)
    assert host is not None and gpu is not None and gpu.keys.is_cuda
    for tensor in ("keys", "values"):
        assert torch.equal(getattr(fast, tensor), getattr(host, tensor))
        torch.testing.assert_close(getattr(gpu, tensor).cpu().float(), getattr(host, tensor).float(), atol=1e-2,
                                   rtol=1e-2)
