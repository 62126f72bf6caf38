"""A KV cache's first slots copied into another cache of a different capacity, in one launch on CUDA.

A blend's probe pass runs on a fixed arena (chunkcache/probe.py: CUDA graphs read fixed addresses) and the
request's own cache is then a copy of the arena's first `length` slots. Both are [layers, kv_heads, capacity,
head_dim] with different capacities, so the slots to copy are layers * kv_heads runs of length * head_dim
contiguous elements at different strides. PyTorch copies such a strided view element by element (its
non-vectorised elementwise kernel): 325 us for each of the keys and values of 4k tokens of Llama-3-8B on the
H200 (268 MB each, 1.65 TB/s of reads and writes; bench/results/ttft-2026-12-01.md), where a copy of
contiguous runs moves about twice that. Here one program copies BLOCK contiguous elements of one run.

`copy_slots_reference` is the PyTorch version (CPU, and shapes the kernel does not take); the kernel is
checked against it under TRITON_INTERPRET=1 on CPU tensors and in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK = 4096  # elements a program copies (8 KiB of bf16)


def _check(src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
    if src.dim() != 4 or dst.dim() != 4 or src.shape[:2] != dst.shape[:2] or src.shape[3] != dst.shape[3] \
            or src.dtype != dst.dtype or not 0 <= length <= min(src.shape[2], dst.shape[2]):
        raise ValueError(f"copy_slots needs src and dst [layers, kv_heads, capacity, head_dim] of one dtype and "
                         f"0 <= length <= both capacities, got {tuple(src.shape)} {src.dtype}, "
                         f"{tuple(dst.shape)} {dst.dtype}, length {length}")


def copy_slots_reference(src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
    """dst[:, :, :length] = src[:, :, :length]."""
    _check(src, dst, length)
    dst[:, :, :length] = src[:, :, :length]


if triton is not None:

    @triton.jit
    def _copy_slots_kernel(src, dst, run, src_run_stride, dst_run_stride, BLOCK: tl.constexpr):
        # Program (r, b): elements [b * BLOCK, (b + 1) * BLOCK) of run r (one layer's one KV head).
        first = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < run
        values = tl.load(src + first * src_run_stride + offsets, mask=inside)
        tl.store(dst + first * dst_run_stride + offsets, values, mask=inside)


def _kernel_takes(src: torch.Tensor, dst: torch.Tensor) -> bool:
    on_gpu = (src.is_cuda and dst.is_cuda and src.device == dst.device) or os.environ.get("TRITON_INTERPRET") == "1"
    # Each run (a layer's KV head) must be contiguous slots of contiguous head_dim vectors.
    runs_ok = all(t.stride(3) == 1 and t.stride(2) == t.shape[3] and t.stride(0) == t.shape[1] * t.stride(1)
                  for t in (src, dst))
    return triton is not None and on_gpu and runs_ok


def copy_slots(src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
    """dst[:, :, :length] = src[:, :, :length] for src [layers, kv_heads, capacity_a, head_dim] and dst
    [layers, kv_heads, capacity_b, head_dim] of one dtype (keys or values of two KVCaches). On CUDA one launch
    over contiguous runs; elsewhere, or for layouts other than KVCache's, the reference. Raises ValueError for
    mismatched shapes or a length past either capacity. No host synchronisation."""
    _check(src, dst, length)
    if not _kernel_takes(src, dst):
        copy_slots_reference(src, dst, length)
        return
    run = length * src.shape[3]
    if run == 0:
        return
    runs = src.shape[0] * src.shape[1]
    _copy_slots_kernel[(runs, triton.cdiv(run, BLOCK))](src, dst, run, src.stride(1), dst.stride(1), BLOCK=BLOCK,
                                                        num_warps=4)
