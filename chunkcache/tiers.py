"""The chunk-cache store's storage backends (tiers), behind one interface: GPU or CPU memory, and disk.

A tier stores and reads entries and keeps their bookkeeping (bytes used, each entry's EntryInfo in recency
order); which entry leaves a full tier is the eviction policy's choice (eviction.py), and moving entries
between tiers is the store's (kv_store.py). Disk entries are encoded by codec/ (`Codec`) and checked on every read,
and decoded on the blend's GPU where the codec decodes faster there (Codec.decode_device).
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .codec import Codec
from .eviction import EntryInfo
from .keys import ChunkKey
from .kv import ChannelWeights, ChunkKV

if TYPE_CHECKING:
    from ..engine.llama import LlamaFamilyModel

log = logging.getLogger(__name__)


def pinned_block_bytes(nbytes: int) -> int:
    """The bytes of pinned host memory a tensor of `nbytes` takes: PyTorch's caching host allocator
    (ATen/core/CachingHostAllocator.h) rounds every allocation up to a power of two and keeps freed blocks in free
    lists by that size. 0 for 0."""
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def chunk_tensor_bytes(model: LlamaFamilyModel, tokens: int) -> int:
    """Bytes of a `tokens`-token chunk's keys (as many for its values) as the chunk-cache stores them for `model`
    ([layers, kv_heads, tokens, head_dim] in its dtype, ChunkKV): what MemoryTier.reserve takes."""
    return model.num_layers * model.kv_heads * tokens * model.head_dim * model.dtype.itemsize


class Tier(ABC):
    """One storage level with a byte budget. Not thread-safe on its own: the store serialises access."""

    def __init__(self, name: str, budget_bytes: int) -> None:
        self.name = name
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[ChunkKey, EntryInfo] = OrderedDict()  # least recently used first
        self.used_bytes = 0

    def admit(self, key: ChunkKey, info: EntryInfo) -> None:
        """Records an entry just written (as the most recently used)."""
        self.forget(key)
        self.entries[key] = info
        self.used_bytes += info.nbytes

    def touch(self, key: ChunkKey) -> None:
        """Records a hit on the entry: it becomes the most recently used."""
        self.entries.move_to_end(key)

    def forget(self, key: ChunkKey) -> EntryInfo | None:
        """Drops the entry's bookkeeping (not its data: `remove`); its EntryInfo, or None when not held."""
        info = self.entries.pop(key, None)
        if info is not None:
            self.used_bytes -= info.nbytes
        return info

    @abstractmethod
    def read(self, key: ChunkKey) -> ChunkKV | None:
        """The entry's KV, or None when this tier cannot give it (missing, or damaged on disk)."""

    @abstractmethod
    def write(self, key: ChunkKey, kv: ChunkKV) -> int:
        """Stores the entry; returns the bytes it takes in this tier."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> None:
        """Deletes the entry's data (nothing happens when there is none)."""


class MemoryTier(Tier):
    """Tensors kept in GPU or CPU memory (pinned on the CPU when there is a GPU, for fast copies up). A pinned
    tier counts each tensor at the pinned block it takes (pinned_block_bytes), so its budget is the pinned memory
    it holds."""

    def __init__(self, name: str, budget_bytes: int, device: str | torch.device) -> None:
        super().__init__(name, budget_bytes)
        self.device = torch.device(device)
        self._data: dict[ChunkKey, ChunkKV] = {}
        self._pin = self.device.type == "cpu" and torch.cuda.is_available()
        # Entries copied down from the GPU whose copies may still be running: the event each waits for.
        self._copying: dict[ChunkKey, torch.cuda.Event] = {}
        # Pinned blocks held for entries not yet written (`reserve`), each of `_reserved_block` bytes.
        self._reserved: list[torch.Tensor] = []
        self._reserved_block = 0

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._pin and tensor.is_cuda:
            # Down from the GPU (a demotion): one copy straight into pinned memory, queued on the current stream
            # behind the work that computed it, not waited for. `.to("cpu").pin_memory()` made two copies, the
            # first into pageable memory with the host waiting: ~20 ms for an 8B model's 512-token chunk, on
            # every miss and promotion once the GPU tier is full. The caching host allocator reuses the pinned
            # blocks of entries evicted.
            return self._pinned_like(tensor).copy_(tensor, non_blocking=True)
        # From pinned memory the copy to the GPU is queued, not waited for (the host allocator keeps the source
        # alive until it is done).
        tensor = tensor.to(self.device, non_blocking=tensor.is_pinned())
        return self._pinned_like(tensor).copy_(tensor) if self._pin and not tensor.is_pinned() else tensor

    def _pinned_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """Empty pinned host memory for a copy of `tensor`. A reserved block of its size is handed back to the
        caching host allocator first, which gives the same block straight back: no cudaHostAlloc."""
        if self._reserved and pinned_block_bytes(tensor.nbytes) == self._reserved_block:
            self._reserved.pop()  # its last reference: back on the allocator's free list for its size
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)

    @property
    def reserved_bytes(self) -> int:
        """Pinned bytes `reserve` still holds for entries to come (0 once they have all been taken)."""
        return len(self._reserved) * self._reserved_block

    @property
    def pinned(self) -> bool:
        """Whether entries are kept in pinned host memory (a CPU tier on a machine with a GPU)."""
        return self._pin

    def reserve(self, tensor_bytes: int) -> int:
        """Pins this tier's budget now, as the blocks that entries whose keys and values take up to `tensor_bytes`
        each (a chunk of the configured size) will be given, where otherwise each new entry pinned fresh memory
        (cudaHostAlloc: page-locking its 2 x `tensor_bytes`, on the serving thread, while the request waits) until
        the tier was full. The tier holds the blocks itself and hands one to the caching host allocator just before
        each entry of that size is written, which gives it straight back. Left in the allocator's free list
        instead, they were released by the first CUDA graph captured after (torch.cuda.graph empties the host
        allocator's cache; SGLang captures its graphs after the plugin starts): measured on the H200 on
        2026-12-03, demotions still pinned 25 ms of memory a request. Entries of another size are pinned as they
        come. Pinned memory is held for the process's life, as SGLang's HiCache host pool and LMCache's CPU
        buffer are allocated at start-up. Returns the bytes pinned: 0 for a tier that is not pinned, or for a
        `tensor_bytes` of 0 or one block larger than the budget; less than the budget when the host refuses to
        pin more (logged as a warning: the blocks pinned so far stay reserved, and entries beyond them are pinned
        as they come, as without a reservation). A second call replaces the blocks still held."""
        block = pinned_block_bytes(tensor_bytes)
        if not self._pin or block == 0:
            return 0
        started, blocks = time.perf_counter(), []
        try:
            for _ in range(self.budget_bytes // block):
                blocks.append(torch.empty(block, dtype=torch.uint8, pin_memory=True))
        except RuntimeError as exc:
            log.warning("chunk-cache tier %s: the host pinned %.1f of %.1f GiB, then refused: %s", self.name,
                        len(blocks) * block / 2**30, self.budget_bytes / 2**30, exc)
        reserved = len(blocks) * block
        self._reserved, self._reserved_block = blocks, block
        if reserved:
            log.info("chunk-cache tier %s: %.1f GiB pinned at start-up (blocks of %.1f MiB) in %.1f s", self.name,
                     reserved / 2**30, block / 2**20, time.perf_counter() - started)
        return reserved

    def read(self, key: ChunkKey) -> ChunkKV | None:
        copying = self._copying.pop(key, None)
        if copying is not None:  # the host may read it (a codec, a lower tier): its copy down must be done
            copying.synchronize()
        return self._data.get(key)

    def write(self, key: ChunkKey, kv: ChunkKV) -> int:
        # Token ids stay on the host: blending reads them there, and a GPU copy would make it wait.
        # The channel weights (small) go where the KV goes, so a GPU tier's demoted entries hold no GPU memory.
        weights = None if kv.weights is None else ChannelWeights(self._place(kv.weights.keys))
        stored = ChunkKV(kv.token_ids.cpu(), self._place(kv.keys), self._place(kv.values), weights)
        self._data[key] = stored
        if self._pin and kv.keys.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(kv.keys.device))
            self._copying[key] = event
        if not self._pin:
            return stored.nbytes
        pinned = [stored.keys, stored.values] + ([stored.weights.keys] if stored.weights is not None else [])
        return stored.token_ids.nbytes + sum(pinned_block_bytes(t.nbytes) for t in pinned)

    def remove(self, key: ChunkKey) -> None:
        self._data.pop(key, None)
        self._copying.pop(key, None)


class DiskTier(Tier):
    """Files in a folder, written to a temporary name and renamed; checked on every read. Entries left by
    earlier runs are found at start (their recompute cost is not known: 0). `device`: the blend's; entries are
    decoded where `codec.decode_device(device)` says (on that GPU for the cachegen codec, else on the host)."""

    def __init__(self, name: str, budget_bytes: int, directory: Path, codec: Codec | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__(name, budget_bytes)
        self.directory = directory
        self.codec = codec or Codec()
        self.decode_device = self.codec.decode_device(device)
        directory.mkdir(parents=True, exist_ok=True)
        # Entries from earlier runs, oldest first; their keys are recovered from the file names.
        for path in sorted(directory.glob("*.kv"), key=lambda p: p.stat().st_mtime):
            parts = path.stem.split("-")
            if len(parts) == 3:
                self.admit(ChunkKey(*parts), EntryInfo(nbytes=path.stat().st_size, recompute_cost=0.0))

    def _path(self, key: ChunkKey) -> Path:
        return self.directory / f"{key.name}.kv"

    def read(self, key: ChunkKey) -> ChunkKV | None:
        try:
            data = self._path(key).read_bytes()
        except OSError:
            return None
        kv = self.codec.decode(key, data, self.decode_device)
        if kv is None:
            self.remove(key)
        return kv

    def write(self, key: ChunkKey, kv: ChunkKV) -> int:
        data = self.codec.encode(key, kv)
        path = self._path(key)
        temporary = path.with_suffix(".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
        return len(data)

    def remove(self, key: ChunkKey) -> None:
        self._path(key).unlink(missing_ok=True)
