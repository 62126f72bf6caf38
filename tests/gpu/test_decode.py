"""The batched decode on CUDA: the flash-decoding kernel (kernels/decode_attention.py) against its PyTorch
reference, and the graph-captured decode step (engine/decode.py) against the same step run eagerly and against
the one-request decode over the request's own KVCache (logits equal within bf16 tolerance)."""

from __future__ import annotations

import pytest
import torch
from blendgate.engine.batch import DecodeBatch
from blendgate.engine.decode import BatchDecoder
from blendgate.engine.kv_pool import PAGE_SIZE, BlockAllocator, blocks_for
from blendgate.engine.llama import LlamaFamilyModel
from blendgate.engine.paged_kv import PagedKVPool
from blendgate.kernels.decode_attention import decode_attention, decode_attention_reference
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(32, 8, 128), (9, 3, 64), (8, 8, 64), (28, 4, 128)])
@pytest.mark.parametrize("splits", [None, 1, 16])
def test_the_decode_kernel_matches_its_reference(dtype, heads, kv_heads, head_dim, splits) -> None:
    generator = torch.Generator(device="cuda").manual_seed(heads + kv_heads)
    lengths = [1, PAGE_SIZE, PAGE_SIZE + 1, 63, 64, 65, 1000, 5000]
    num_blocks = sum(blocks_for(n) for n in lengths) + 1
    keys = torch.randn(kv_heads, num_blocks * PAGE_SIZE, head_dim, device="cuda", dtype=dtype, generator=generator)
    values = torch.randn_like(keys)
    order = torch.randperm(num_blocks - 1, device="cuda", generator=generator) + 1  # scattered blocks
    tables = torch.zeros(len(lengths), blocks_for(max(lengths)), dtype=torch.int32, device="cuda")
    used = 0
    for row, length in enumerate(lengths):
        tables[row, : blocks_for(length)] = order[used: used + blocks_for(length)]
        used += blocks_for(length)
    q = torch.randn(len(lengths), heads, head_dim, device="cuda", dtype=dtype, generator=generator)
    lengths_gpu = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    expected = decode_attention_reference(q.double(), keys.double(), values.double(), tables, lengths_gpu,
                                          PAGE_SIZE)
    got = decode_attention(q, keys, values, tables, lengths_gpu, PAGE_SIZE, splits=splits)
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)



@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return LlamaFamilyModel.random(tiny_config(max_positions=4096), device="cuda", dtype=torch.bfloat16, seed=3)


def test_graph_replays_give_the_eager_steps_logits_and_the_one_request_decode(model) -> None:
    """Requests of different lengths decode together; the batch shrinks between steps (padding rows that held
    real requests on the previous replay must not write their KV), graphs against eager and against each
    request's own KVCache decoded alone."""
    lengths = [5, 40, 300, 1200, 17, 64, 129]
    generator = torch.Generator(device="cuda").manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), device="cuda", generator=generator) for n in lengths]
    allocator = BlockAllocator(num_blocks=256, rows=8)
    pools, decoders = [], []
    for graphs in (True, False):
        pool = PagedKVPool(model, allocator.num_blocks, allocator.rows, blocks_for(2048))
        pools.append(pool)
        decoders.append(BatchDecoder(model, pool, 8, 2048, graphs=graphs))
    own_caches, allocations, tokens = [], [], []
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            cache = model.new_cache(len(ids) + 16)
            logits = model.forward(ids, None, cache)
            allocations.append(allocator.allocate(i, len(ids) + 16))
            for pool in pools:
                pool.store(allocations[i], cache)
            own_caches.append(cache)
            tokens.append(int(logits[-1].argmax()))
        active = list(range(len(prompts)))
        for step in range(6):
            if step == 3:
                active = active[:5]  # still bucket 8: rows 5 and 6 held real requests and become padding
            positions = [lengths[i] + step for i in active]
            batch = DecodeBatch(tuple(active), tuple(tokens[i] for i in active), tuple(positions),
                                tuple(allocations[i].slot(p) for i, p in zip(active, positions)),
                                tuple(allocations[i].row for i in active))
            graphed = decoders[0].decode(batch).clone()
            eager = decoders[1].decode(batch)
            torch.testing.assert_close(graphed, eager, atol=2e-2, rtol=2e-2)
            for row, i in enumerate(active):
                alone = model.forward(torch.tensor([tokens[i]], device="cuda"), None, own_caches[i])[-1]
                torch.testing.assert_close(graphed[row], alone, atol=5e-2, rtol=5e-2)
                tokens[i] = int(graphed[row].argmax())
    # The requests dropped at step 3 kept the KV they had: the padding rows wrote the scratch block only.
    for i in (5, 6):
        slots = torch.tensor(allocations[i].slots(lengths[i] + 3), device="cuda")
        for graphed_kv, eager_kv in ((pools[0].keys, pools[1].keys), (pools[0].values, pools[1].values)):
            torch.testing.assert_close(graphed_kv[:, :, slots], eager_kv[:, :, slots], atol=5e-2, rtol=5e-2)
