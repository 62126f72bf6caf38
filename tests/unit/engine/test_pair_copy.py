"""SpeCache's pair copies (kernels/pair_copy.py): the reference copies exactly the taken rows to their slots
(and leaves the rest), indices broadcast by a stride of 0 write one position of every row, bad shapes are
refused, and the Triton kernel gives the reference's result where Triton runs on the CPU
(TRITON_INTERPRET=1; skipped otherwise; from pinned host memory in tests/gpu/test_specache_cuda.py)."""

from __future__ import annotations

import os

import pytest
import torch
from blendgate.kernels import pair_copy
from blendgate.kernels.pair_copy import copy_pairs, copy_pairs_reference


def case(seed: int, head_dim: int = 64):
    generator = torch.Generator().manual_seed(seed)
    src = torch.randn(3, 50, head_dim, generator=generator)
    dst = torch.randn(3, 20, head_dim, generator=generator)
    src_index = torch.stack([torch.randperm(50, generator=generator)[:8] for _ in range(3)])
    dst_index = torch.stack([torch.randperm(20, generator=generator)[:8] for _ in range(3)])
    take = torch.rand(3, 8, generator=generator) < 0.6
    return src, src_index, dst, dst_index, take


def test_the_reference_copies_the_taken_rows_only() -> None:
    src, src_index, dst, dst_index, take = case(0)
    expected = dst.clone()
    for r in range(3):
        for j in range(8):
            if take[r, j]:
                expected[r, dst_index[r, j]] = src[r, src_index[r, j]]
    copy_pairs_reference(src, src_index, dst, dst_index, take)
    assert torch.equal(dst, expected)


def test_a_broadcast_index_writes_one_position_of_every_row() -> None:
    src, _, dst, _, _ = case(1)
    slot, position = torch.tensor([7]), torch.tensor([13])
    copy_pairs(src, slot.view(1, 1).expand(3, 1), dst, position.view(1, 1).expand(3, 1))
    assert torch.equal(dst[:, 13], src[:, 7])


def test_bad_shapes_are_refused() -> None:
    src, src_index, dst, dst_index, take = case(2)
    with pytest.raises(ValueError, match="copy_pairs needs"):
        copy_pairs(src, src_index[:, :4], dst, dst_index, take)
    with pytest.raises(ValueError, match="copy_pairs needs"):
        copy_pairs(src[:2], src_index, dst, dst_index, take)


@pytest.mark.skipif(pair_copy.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel on CPU tensors needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_its_reference(head_dim, dtype) -> None:
    src, src_index, dst, dst_index, take = case(head_dim, head_dim)
    src, dst = src.to(dtype), dst.to(dtype)
    expected = dst.clone()
    copy_pairs_reference(src, src_index, expected, dst_index, take)
    copy_pairs(src, src_index, dst, dst_index, take)
    assert torch.equal(dst, expected)
    flat = src.transpose(0, 1)  # strided rows: [50, 3, d] viewed as [3, 50, d]
    expected, got = dst.clone(), dst.clone()
    copy_pairs_reference(flat.transpose(0, 1), src_index, expected, dst_index)
    copy_pairs(flat.transpose(0, 1), src_index, got, dst_index)
    assert torch.equal(got, expected)
