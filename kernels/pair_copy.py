"""KV pairs copied between a request's host tier and the GPU pool by index, without the host reading the indices.

SpeCache (arXiv 2503.16163, engine/specache.py) decides on the GPU which KV pairs a decode step reads (top-k
of the low-bit scores) and which of them are missing from the GPU budget. Gathering them on the host would need
the indices there: a device-to-host copy and a wait, per layer and step. Instead one kernel, launched with a
fixed grid, reads the selected rows straight from page-locked host memory (CUDA's unified addressing: a pinned
host tensor's address is valid on the device, so the kernel's loads cross PCIe) and writes them to their pool
slots; a mask says which rows of the fixed-size lists to copy, so no count is read back either (as DGL's and
PyG's UVA gathers of pinned feature tables). The same kernel writes each step's new pair from the pool to the
host tier.

Layout: `src` [rows, n, head_dim] and `dst` [rows, m, head_dim] (any strides but the last; on CUDA each on
the device or in pinned host memory), `src_index` and `dst_index` [rows, k] long on `dst`'s side (any
strides: a stride of 0 broadcasts one position to every row), `take` [rows, k] bool or None (all):
dst[r, dst_index[r, j]] = src[r, src_index[r, j]] where take[r, j]. `copy_pairs_reference` is the PyTorch
version (CPU, and CUDA shapes the kernel does not take); the kernel is checked against it under
TRITON_INTERPRET=1 on CPU tensors and in tests/gpu/test_specache_cuda.py from pinned memory.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


def _check(src: torch.Tensor, src_index: torch.Tensor, dst: torch.Tensor, dst_index: torch.Tensor,
           take: torch.Tensor | None) -> None:
    rows, k = dst_index.shape
    if src.dim() != 3 or dst.dim() != 3 or src.shape[0] != rows or dst.shape[0] != rows or \
            src.shape[2] != dst.shape[2] or src_index.shape != (rows, k) or \
            (take is not None and take.shape != (rows, k)):
        raise ValueError(f"copy_pairs needs src [rows, n, d], dst [rows, m, d] and indices [rows, k], got "
                         f"{tuple(src.shape)}, {tuple(dst.shape)}, {tuple(src_index.shape)}, "
                         f"{tuple(dst_index.shape)}")


def copy_pairs_reference(src: torch.Tensor, src_index: torch.Tensor, dst: torch.Tensor, dst_index: torch.Tensor,
                         take: torch.Tensor | None = None) -> None:
    """dst[r, dst_index[r, j]] = src[r, src_index[r, j]] where take[r, j] (everywhere without `take`). On CUDA
    with a host `src` this reads the indices back (a sync): the kernel's fallback only."""
    _check(src, src_index, dst, dst_index, take)
    rows = torch.arange(dst_index.shape[0], device=dst_index.device)[:, None].expand_as(dst_index)
    mask = torch.ones_like(dst_index, dtype=torch.bool) if take is None else take
    r, s, d = rows[mask], src_index[mask], dst_index[mask]
    dst[r, d] = src[r.to(src.device), s.to(src.device)].to(dst.device, dst.dtype)


if triton is not None:

    @triton.jit
    def _copy_kernel(src, src_index, dst, dst_index, take, src_row, src_pos, dst_row, dst_pos, si_row, si_col,
                     di_row, di_col, t_row, t_col, HAS_TAKE: tl.constexpr, HEAD_DIM: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        width = HEAD_DIM
        if HAS_TAKE:  # a row not taken copies no element
            width = tl.where(tl.load(take + row.to(tl.int64) * t_row + j * t_col) != 0, HEAD_DIM, 0)
        go = d < width
        s = tl.load(src_index + row.to(tl.int64) * si_row + j * si_col)
        t = tl.load(dst_index + row.to(tl.int64) * di_row + j * di_col)
        pair = tl.load(src + row.to(tl.int64) * src_row + s * src_pos + d, mask=go)
        tl.store(dst + row.to(tl.int64) * dst_row + t * dst_pos + d, pair.to(dst.dtype.element_ty), mask=go)


def _kernel_applies(src: torch.Tensor, dst: torch.Tensor, *indices: torch.Tensor) -> bool:
    head_dim = src.shape[2]
    if triton is None or src.stride(2) != 1 or dst.stride(2) != 1 or head_dim & (head_dim - 1):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return not any(t.is_cuda for t in (src, dst, *indices))
    reachable = all(t.is_cuda or t.is_pinned() for t in (src, dst))
    return reachable and (src.is_cuda or dst.is_cuda) and all(t.is_cuda for t in indices)


def copy_pairs(src: torch.Tensor, src_index: torch.Tensor, dst: torch.Tensor, dst_index: torch.Tensor,
               take: torch.Tensor | None = None) -> None:
    """As `copy_pairs_reference`, one Triton launch of rows x k programs on CUDA (asynchronous, on the current
    stream, either side in pinned host memory), with no read-back. ValueError for mismatched shapes."""
    _check(src, src_index, dst, dst_index, take)
    indices = (src_index, dst_index) if take is None else (src_index, dst_index, take)
    if not _kernel_applies(src, dst, *indices):
        copy_pairs_reference(src, src_index, dst, dst_index, take)
        return
    rows, k = dst_index.shape
    if rows and k:
        flags = take.view(torch.uint8) if take is not None else dst_index
        _copy_kernel[(rows, k)](
            src, src_index, dst, dst_index, flags, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
            src_index.stride(0), src_index.stride(1), dst_index.stride(0), dst_index.stride(1),
            flags.stride(0), flags.stride(1), HAS_TAKE=take is not None, HEAD_DIM=src.shape[2])
