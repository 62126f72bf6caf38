"""SpeCache's two tiers of a request's KV: full precision in (pinned) host memory, low-bit keys on the device.

A request that SpeCache serves (engine/specache.py) copies its finished prefill's KV here: `HostKV` holds every
position's rotated keys and values, [layers, kv_heads, capacity, head_dim] in the model's dtype, in page-locked
memory when the model runs on CUDA (so kernels on the device read and write it by index: kernels/pair_copy.py);
decode steps append their new token's pair, and copy the pairs a step selects to the GPU. `LowBitKeys` holds
the 1- or 2-bit copy of the keys on the model's device (kernels/lowbit_keys.py: whole groups of 32 or 64
tokens), which decode steps score their query against. Plain containers: the decoder decides what moves when.
"""

from __future__ import annotations

import torch

from ..kernels.lowbit_keys import QuantizedKeys, quantize
from ..kernels.pair_copy import copy_pairs
from .llama import KVCache


class HostKV:
    """One request's full-precision KV in host memory, positions 0..length-1 valid."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 pin: bool) -> None:
        shape = (layers, kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.values = torch.empty(shape, dtype=dtype, pin_memory=pin)
        self.length = 0

    @classmethod
    def from_cache(cls, cache: KVCache, capacity: int) -> "HostKV":
        """A prefill's KV (slots 0..length-1, slot j holding position j) copied out, room for `capacity`."""
        layers, kv_heads, _, head_dim = cache.keys.shape
        host = cls(layers, kv_heads, head_dim, max(capacity, cache.length), cache.keys.dtype,
                   pin=cache.keys.is_cuda)
        host.keys[:, :, : cache.length].copy_(cache.keys[:, :, : cache.length])
        host.values[:, :, : cache.length].copy_(cache.values[:, :, : cache.length])
        host.length = cache.length
        return host

    @property
    def bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def append(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor) -> None:
        """A decode step's new pair, every layer, at position `length` (which grows by one): `keys` and `values`
        the pool's [layers, kv_heads, slots, head_dim] on the device, `slot` [1] long there, the pair's pool
        slot. On CUDA a kernel writes the pinned memory (kernels/pair_copy.py), on the current stream: nothing
        waits for it, and what reads these pairs later (the step's gathers) runs after it on the device.
        ValueError past the capacity."""
        self._check_room()
        position = torch.full((1,), self.length, dtype=torch.long, device=slot.device)
        self.write(keys, values, slot, position)
        self.length += 1

    def write(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor, position: torch.Tensor) -> None:
        """As `append` at a `position` [1] long on the device, without touching `length` (a captured step's
        device work, engine/specache_graph.py: the decoder calls `advance` after each replay)."""
        rows = self.keys.shape[0] * self.keys.shape[1]
        source, target = slot.view(1, 1).expand(rows, 1), position.view(1, 1).expand(rows, 1)
        copy_pairs(keys.flatten(0, 1), source, self.keys.flatten(0, 1), target)
        copy_pairs(values.flatten(0, 1), source, self.values.flatten(0, 1), target)

    def advance(self) -> None:
        """Count the pair a step wrote at position `length` (`write`); ValueError past the capacity."""
        self._check_room()
        self.length += 1

    def _check_room(self) -> None:
        if self.length >= self.keys.shape[2]:
            raise ValueError(f"position {self.length} is past the host KV's {self.keys.shape[2]} positions")


class LowBitKeys:
    """One request's low-bit keys on the device, all layers: the first `length` positions (whole groups)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, bits: int, group: int,
                 device: torch.device) -> None:
        groups = -(-capacity // group)
        self.codes = torch.zeros((layers, kv_heads, groups * group, head_dim * bits // 8), dtype=torch.uint8,
                                 device=device)
        self.zeros = torch.zeros((layers, kv_heads, groups, head_dim), dtype=torch.float16, device=device)
        self.steps = torch.zeros_like(self.zeros)
        self.bits = bits
        self.group = group
        self.length = 0

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.zeros, self.steps))

    def layer(self, layer: int) -> QuantizedKeys:
        return QuantizedKeys(self.codes[layer], self.zeros[layer], self.steps[layer], self.bits, self.group)

    def append(self, keys: torch.Tensor) -> None:
        """Quantise the keys of the next whole groups, positions length..length+n-1: `keys` [layers, kv_heads,
        n, head_dim] on the device, n a multiple of the group (after a prefill: its cache's keys; after a
        decode step that completes a group: the group's keys from the pool's recent window). A launch a layer
        (a prefill's keys are a strided slice of its cache: no copy of them); ValueError for a partial group."""
        n = keys.shape[2]
        if n % self.group:
            raise ValueError(f"low-bit keys are appended a whole group of {self.group} tokens at a time, not {n}")
        start, end = self.length, self.length + n
        for layer in range(keys.shape[0]):
            quantized = quantize(keys[layer], self.bits, self.group)
            self.codes[layer, :, start:end] = quantized.codes
            self.zeros[layer, :, start // self.group: end // self.group] = quantized.zeros
            self.steps[layer, :, start // self.group: end // self.group] = quantized.steps
        self.length = end
