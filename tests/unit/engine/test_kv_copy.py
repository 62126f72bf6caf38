"""kernels/kv_copy.py: a cache's first slots into a cache of another capacity (the reference on CPU, the Triton
kernel under TRITON_INTERPRET=1 where triton is installed; tests/gpu/test_kernels.py runs it on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
from blendgate.engine.llama import KVCache
from blendgate.kernels import kv_copy


def caches(capacities: tuple[int, int], dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randn(3, 2, capacities[0], 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    dst = torch.full((3, 2, capacities[1], 8), float("nan"), dtype=dtype)
    return src, dst


@pytest.mark.parametrize("capacities,length", [((40, 25), 20), ((10, 30), 10), ((5, 5), 0)])
def test_the_first_slots_are_copied_and_nothing_else(capacities, length) -> None:
    src, dst = caches(capacities)
    kv_copy.copy_slots(src, dst, length)
    assert torch.equal(dst[:, :, :length], src[:, :, :length])
    assert dst[:, :, length:].isnan().all()


@pytest.mark.parametrize("bad", ["length", "heads", "dtype"])
def test_mismatched_caches_are_refused(bad) -> None:
    src, dst = caches((10, 10))
    if bad == "heads":
        dst = dst[:, :1]
    elif bad == "dtype":
        dst = dst.double()
    with pytest.raises(ValueError, match="copy_slots"):
        kv_copy.copy_slots(src, dst, 11 if bad == "length" else 5)


def test_a_cache_clone_keeps_its_slots_and_grows() -> None:
    cache = KVCache(2, 2, 8, 6, torch.float32, torch.device("cpu"))
    cache.keys.normal_()
    cache.values.normal_()
    cache.positions[:4] = torch.tensor([0, 1, 2, 3])
    cache.length = 4
    copy = cache.clone(9)
    assert copy.capacity == 9 and copy.length == 4
    assert torch.equal(copy.keys[:, :, :4], cache.keys[:, :, :4])
    assert torch.equal(copy.values[:, :, :4], cache.values[:, :, :4])
    copy.grow(20)
    assert copy.capacity >= 20 and torch.equal(copy.keys[:, :, :4], cache.keys[:, :, :4])


@pytest.mark.skipif(kv_copy.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel on CPU tensors needs triton and TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_matches_the_reference_under_the_interpreter(dtype) -> None:
    src, dst = caches((5000, 4500), dtype)  # runs longer than one program's block
    kv_copy.copy_slots(src, dst, 4321)
    assert torch.equal(dst[:, :, :4321], src[:, :, :4321]) and dst[:, :, 4321:].isnan().all()
