"""Low-bit copies of a request's keys on the GPU, and the scores of a decode query against them (SpeCache).

SpeCache (Jie et al., "SpeCache: Speculative Key-Value Caching for Efficient Generation of LLMs", arXiv
2503.16163) keeps a request's full-precision KV in CPU memory and a 1- or 2-bit copy of its keys on the GPU:
each decode step scores the query against the low-bit keys and fetches only the top-scored KV pairs. Keys have
outlier channels, so they are quantised per channel (as KIVI, arXiv 2402.02750, does): a group of `group`
consecutive tokens (32 or 64, `GROUPS`) shares one zero point and one step per channel, min-max asymmetric,
codes 0..2^bits-1. Per key of head_dim channels that is head_dim * bits / 8 bytes of codes plus
4 * head_dim / group bytes of float16 zero points and steps: 1-bit keys in groups of 64 take 3/64 of a bf16
key and value pair, 2-bit keys in groups of 32 take 6/64.

Layout, for one layer: keys [kv_heads, tokens, head_dim] (rotated, the pool's layout); codes
[kv_heads, tokens, head_dim * bits // 8] uint8, 8 // bits channels a byte (channel c in byte c // per at bit
(c % per) * bits); zeros and steps [kv_heads, tokens // group, head_dim] float16 (codes are computed from
the float16-rounded ones, so the round trip is within half a step). Only whole groups are
quantised: a request's last, partial group is in its recent window, which SpeCache keeps at full precision.

`score` gives [kv_heads, tokens] float32: for each KV head, the largest over its query heads (GQA) of
q . k_hat / sqrt(head_dim), the attention logit with the dequantised keys; the top-k positions per KV head are
then the union of what the group's heads would pick. PyTorch references (`quantize_reference`,
`score_reference`) run on CPU and are what the Triton kernels are tested against (under TRITON_INTERPRET=1
on CPU tensors, and on CUDA in tests/gpu/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds run the references.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

GROUPS = (32, 64)  # tokens sharing a zero point and a step per channel (KIVI's group sizes)
GROUP = GROUPS[0]  # the default group
BITS = (1, 2)


@dataclass
class QuantizedKeys:
    """One layer's low-bit keys, from the quantiser to the scorer: `codes` [kv_heads, tokens, head_dim * bits
    // 8] uint8, `zeros` and `steps` [kv_heads, tokens // group, head_dim] float16."""

    codes: torch.Tensor
    zeros: torch.Tensor
    steps: torch.Tensor
    bits: int
    group: int

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.zeros, self.steps))


def _check(keys: torch.Tensor, bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"low-bit keys take 1 or 2 bits, not {bits}")
    if group not in GROUPS:
        raise ValueError(f"low-bit keys are grouped by {' or '.join(map(str, GROUPS))} tokens, not {group}")
    if keys.dim() != 3 or keys.shape[1] % group or (keys.shape[2] * bits) % 8:
        raise ValueError(f"keys must be [kv_heads, tokens, head_dim] with tokens a multiple of {group} and "
                         f"head_dim * bits a multiple of 8, got {tuple(keys.shape)} at {bits} bits")


def quantize_reference(keys: torch.Tensor, bits: int, group: int = GROUP) -> QuantizedKeys:
    """Per-channel min-max quantisation of `keys` [kv_heads, tokens, head_dim] (tokens a multiple of `group`);
    ValueError for other bits, groups or shapes."""
    _check(keys, bits, group)
    kv_heads, tokens, head_dim = keys.shape
    grouped = keys.float().view(kv_heads, tokens // group, group, head_dim)
    low = grouped.amin(dim=2).half().float()
    steps = ((grouped.amax(dim=2) - low) / (2**bits - 1)).half().float()
    safe = torch.where(steps > 0, steps, torch.ones_like(steps))
    # Halves round up, as the kernel's floor(x + 0.5) does (torch.round would round them to even: bf16 keys
    # land on exact halves often enough that the two disagreed on 0.2-0.8% of code bytes on the H200).
    codes = torch.floor((grouped - low[:, :, None]) / safe[:, :, None] + 0.5).clamp(0, 2**bits - 1).to(torch.uint8)
    per = 8 // bits
    codes = codes.view(kv_heads, tokens, head_dim // per, per)
    shifts = torch.arange(per, device=keys.device, dtype=torch.uint8) * bits
    packed = (codes << shifts).sum(dim=-1, dtype=torch.uint8)
    return QuantizedKeys(packed, low.half(), steps.half(), bits, group)


def dequantize_reference(quantized: QuantizedKeys) -> torch.Tensor:
    """The keys the codes stand for: [kv_heads, tokens, head_dim] float32."""
    codes, bits = quantized.codes, quantized.bits
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    unpacked = ((codes[..., None] >> shifts) & (2**bits - 1)).flatten(-2).float()
    kv_heads, tokens, head_dim = unpacked.shape
    grouped = unpacked.view(kv_heads, tokens // quantized.group, quantized.group, head_dim)
    keys = quantized.zeros.float()[:, :, None] + grouped * quantized.steps.float()[:, :, None]
    return keys.view(kv_heads, tokens, head_dim)


def score_reference(q: torch.Tensor, quantized: QuantizedKeys) -> torch.Tensor:
    """q [heads, head_dim] (one decode query, rotated); returns [kv_heads, tokens] float32: per KV head, the
    largest over its query heads of q . k_hat / sqrt(head_dim)."""
    keys = dequantize_reference(quantized)
    kv_heads, _, head_dim = keys.shape
    grouped_q = q.float().view(kv_heads, -1, head_dim)
    return (grouped_q @ keys.transpose(1, 2)).amax(dim=1) / math.sqrt(head_dim)


if triton is not None:

    @triton.jit
    def _quantize_kernel(keys, codes, zeros, steps, key_head, key_token, code_head, stat_head,
                         LEVELS: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, BYTES: tl.constexpr,
                         GROUP: tl.constexpr):
        head = tl.program_id(0)
        group = tl.program_id(1)
        t = group * GROUP + tl.arange(0, GROUP)
        j = tl.arange(0, BYTES)
        i = tl.arange(0, PER)
        channel = j[:, None] * PER + i[None, :]  # [BYTES, PER]
        k = tl.load(keys + head.to(tl.int64) * key_head + t[:, None, None].to(tl.int64) * key_token
                    + channel[None, :, :]).to(tl.float32)  # [GROUP, BYTES, PER]
        low = tl.min(k, axis=0).to(tl.float16).to(tl.float32)
        step = ((tl.max(k, axis=0) - low) / LEVELS).to(tl.float16).to(tl.float32)
        safe = tl.where(step > 0, step, 1.0)
        code = tl.floor((k - low[None]) / safe[None] + 0.5)
        code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
        packed = tl.sum(code << (i * BITS)[None, None, :], axis=2)  # [GROUP, BYTES]
        tl.store(codes + head.to(tl.int64) * code_head + t[:, None].to(tl.int64) * BYTES + j[None, :],
                 packed.to(tl.uint8))
        stat = head.to(tl.int64) * stat_head + group * (BYTES * PER) + channel
        tl.store(zeros + stat, low.to(tl.float16))
        tl.store(steps + stat, step.to(tl.float16))

    @triton.jit
    def _score_kernel(q, codes, zeros, steps, out, tokens, q_head, code_head, stat_head, out_head, scale,
                      GQA: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                      BYTES: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        head = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = t < tokens
        j = tl.arange(0, BYTES)
        i = tl.arange(0, PER)
        channel = j[:, None] * PER + i[None, :]
        packed = tl.load(codes + head.to(tl.int64) * code_head + t[:, None].to(tl.int64) * BYTES + j[None, :],
                         mask=inside[:, None], other=0).to(tl.int32)  # [BLOCK_N, BYTES]
        code = ((packed[:, :, None] >> (i * BITS)[None, None, :]) & LEVELS).to(tl.float32)
        stat = head.to(tl.int64) * stat_head + (t // GROUP)[:, None, None] * (BYTES * PER) + channel[None]
        zero = tl.load(zeros + stat, mask=inside[:, None, None], other=0.0).to(tl.float32)
        k = zero + code * tl.load(steps + stat, mask=inside[:, None, None], other=0.0).to(tl.float32)
        best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        for g in range(GQA):
            query = tl.load(q + (head * GQA + g).to(tl.int64) * q_head + channel).to(tl.float32)
            best = tl.maximum(best, tl.sum(tl.sum(k * query[None], axis=2), axis=1))
        tl.store(out + head.to(tl.int64) * out_head + t, best * scale, mask=inside)


def _triton_ok(*tensors: torch.Tensor) -> bool:
    import os

    on_device = all(t.is_cuda for t in tensors) or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device


def quantize(keys: torch.Tensor, bits: int, group: int = GROUP) -> QuantizedKeys:
    """As `quantize_reference`, one Triton launch (a program per KV head and group) on CUDA. Rounding may differ
    from the reference by one code where a value sits on a half step (float32 division order)."""
    _check(keys, bits, group)
    if not _triton_ok(keys) or keys.stride(-1) != 1 or keys.shape[2] & (keys.shape[2] - 1):
        return quantize_reference(keys, bits, group)
    kv_heads, tokens, head_dim = keys.shape
    per = 8 // bits
    codes = torch.empty((kv_heads, tokens, head_dim // per), dtype=torch.uint8, device=keys.device)
    zeros = torch.empty((kv_heads, tokens // group, head_dim), dtype=torch.float16, device=keys.device)
    steps = torch.empty_like(zeros)
    if tokens:
        _quantize_kernel[(kv_heads, tokens // group)](
            keys, codes, zeros, steps, keys.stride(0), keys.stride(1), codes.stride(0), zeros.stride(0),
            LEVELS=2**bits - 1, BITS=bits, PER=per, BYTES=head_dim // per, GROUP=group)
    return QuantizedKeys(codes, zeros, steps, bits, group)


def score(q: torch.Tensor, quantized: QuantizedKeys, tokens: int | None = None) -> torch.Tensor:
    """As `score_reference` over the first `tokens` positions (all by default; a multiple of the group is not
    needed): [kv_heads, tokens] float32, one Triton launch on CUDA."""
    codes = quantized.codes
    kv_heads, capacity, width = codes.shape
    tokens = capacity if tokens is None else tokens
    head_dim, group = width * 8 // quantized.bits, quantized.group
    if not _triton_ok(q, codes) or head_dim & (head_dim - 1):
        groups = -(-tokens // group)
        return score_reference(q, QuantizedKeys(codes[:, : groups * group], quantized.zeros[:, :groups],
                                                quantized.steps[:, :groups], quantized.bits, group))[:, :tokens]
    q = q.contiguous()
    out = torch.empty((kv_heads, tokens), dtype=torch.float32, device=q.device)
    block = 64
    if tokens:
        _score_kernel[(kv_heads, triton.cdiv(tokens, block))](
            q, codes, quantized.zeros, quantized.steps, out, tokens, q.stride(0), codes.stride(0),
            quantized.zeros.stride(0), out.stride(0), 1 / math.sqrt(head_dim), GQA=q.shape[0] // kv_heads,
            LEVELS=2**quantized.bits - 1, BITS=quantized.bits, PER=8 // quantized.bits, BYTES=width, GROUP=group,
            BLOCK_N=block)
    return out
