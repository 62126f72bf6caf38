"""SpeCache's low-bit keys (kernels/lowbit_keys.py): the quantiser's round trip stays within half a step per
channel (1 and 2 bits, groups of 32 and 64 tokens), scores against dequantised keys are the attention logits
of those keys, and the Triton kernels give the references' codes and scores where Triton runs on the CPU
(TRITON_INTERPRET=1; skipped otherwise)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from blendgate.kernels import lowbit_keys
from blendgate.kernels.lowbit_keys import (
    GROUP,
    GROUPS,
    dequantize_reference,
    quantize,
    quantize_reference,
    score,
    score_reference,
)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", [1, 2])
def test_the_round_trip_is_within_half_a_step_per_channel(bits, group) -> None:
    keys = torch.randn(2, 4 * group, 64, generator=torch.Generator().manual_seed(bits))
    keys[:, :, 3] *= 20  # an outlier channel: per-channel steps keep the others fine
    quantized = quantize_reference(keys, bits, group)
    assert quantized.codes.shape == (2, 4 * group, 64 * bits // 8) and quantized.codes.dtype == torch.uint8
    assert quantized.zeros.shape == quantized.steps.shape == (2, 4, 64)
    # the bytes the policy counts (engine/specache_policy.gpu_kv_bytes): codes, and 4 bytes a group and channel
    assert quantized.bytes == 2 * 4 * group * 64 * bits // 8 + 2 * 4 * 64 * 4
    error = (dequantize_reference(quantized) - keys).abs().view(2, 4, group, 64)
    assert bool((error <= quantized.steps.float()[:, :, None] / 2 + 1e-2).all())


def test_scores_are_the_logits_of_the_dequantised_keys_maxed_over_each_group() -> None:
    keys = torch.randn(2, 2 * GROUP, 64, generator=torch.Generator().manual_seed(0))
    q = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    quantized = quantize_reference(keys, 2)
    logits = q.view(2, 3, 64) @ dequantize_reference(quantized).transpose(1, 2) / math.sqrt(64)
    torch.testing.assert_close(score_reference(q, quantized), logits.amax(dim=1))
    torch.testing.assert_close(score(q, quantized, 20), logits.amax(dim=1)[:, :20])


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        quantize_reference(torch.randn(2, GROUP + 1, 64), 2)
    with pytest.raises(ValueError, match="1 or 2 bits"):
        quantize_reference(torch.randn(2, GROUP, 64), 4)
    with pytest.raises(ValueError, match="32 or 64 tokens, not 16"):
        quantize_reference(torch.randn(2, 64, 64), 2, 16)
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize_reference(torch.randn(2, 96, 64), 1, 64)


@pytest.mark.skipif(lowbit_keys.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels on CPU tensors need triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits, group", [(1, 32), (2, 32), (1, 64), (2, 64)])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128)])
def test_the_kernels_match_their_references(bits, group, heads, kv_heads, head_dim) -> None:
    generator = torch.Generator().manual_seed(bits * head_dim)
    keys = torch.randn(kv_heads, 5 * group, head_dim, generator=generator)
    reference, got = quantize_reference(keys, bits, group), quantize(keys, bits, group)
    assert got.group == group and got.zeros.shape == (kv_heads, 5, head_dim)
    assert bool((reference.codes == got.codes).float().mean() > 0.999)
    torch.testing.assert_close(got.zeros, reference.zeros)
    torch.testing.assert_close(got.steps, reference.steps)
    q = torch.randn(heads, head_dim, generator=generator)
    tokens = 2 * group + 6  # a partial block and a partial group
    torch.testing.assert_close(score(q, reference, tokens), score_reference(q, reference)[:, :tokens], atol=1e-4,
                               rtol=1e-4)
