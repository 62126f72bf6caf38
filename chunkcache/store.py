"""The chunk-cache store: chunk KV in tiers (GPU memory, CPU memory, disk), fastest first.

Keyed by the model's fingerprint, the chunk prefix's tokens and the chunk's tokens, so KV made by another
model, tokenizer or prefix can never be found. Each tier has a byte budget; a tier over budget moves its
least recently used entries down one tier (the last tier drops them). A hit in a lower tier is promoted to
the top. Entries record their hits and recompute cost, so a cost-aware policy (Cache-Craft) can replace LRU.
Disk entries carry a checksum and their key; one that fails either check is deleted, counted as corrupt and
reported as a miss, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .blend import ChunkKV


def token_digest(token_ids: list[int] | torch.Tensor) -> str:
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    return hashlib.sha256(struct.pack(f"<{len(ids)}q", *ids)).hexdigest()[:32]


@dataclass(frozen=True)
class ChunkKey:
    model: str  # the model's fingerprint
    prefix: str  # digest of the chunk prefix's token ids
    tokens: str  # digest of the chunk's token ids

    @classmethod
    def of(cls, model_fingerprint: str, prefix_ids: list[int], chunk_ids: list[int]) -> "ChunkKey":
        return cls(model_fingerprint, token_digest(prefix_ids), token_digest(chunk_ids))

    @property
    def name(self) -> str:
        return f"{self.model}-{self.prefix}-{self.tokens}"


@dataclass
class EntryInfo:
    nbytes: int
    recompute_cost: float  # e.g. the chunk's token count times layers: what a miss costs
    hits: int = 0


class Codec:
    """ChunkKV <-> bytes (safetensors), with a checksum in front. The place for CacheGen-style compression."""

    MAGIC = b"BGKV1"

    def encode(self, key: ChunkKey, kv: ChunkKV) -> bytes:
        body = save_tensors({"token_ids": kv.token_ids.cpu().contiguous(), "keys": kv.keys.cpu().contiguous(),
                             "values": kv.values.cpu().contiguous()}, metadata={"key": key.name})
        return self.MAGIC + hashlib.sha256(body).digest() + body

    def decode(self, key: ChunkKey, data: bytes) -> ChunkKV | None:
        """The entry `data` holds for `key`, or None when the bytes are damaged or hold another key's entry: the
        checksum must match, the key written into the file must be `key`, and its token ids must digest to
        `key.tokens` (a whole valid file of another chunk or model copied over this one is refused too)."""
        header = len(self.MAGIC) + 32
        if len(data) < header or not data.startswith(self.MAGIC):
            return None
        body = data[header:]
        if hashlib.sha256(body).digest() != data[len(self.MAGIC):header]:
            return None
        try:
            tensors = load_tensors(body)
            stored_key = _safetensors_metadata(body).get("key")
        except Exception:  # safetensors raises several types for malformed input
            return None
        if stored_key != key.name or token_digest(tensors["token_ids"]) != key.tokens:
            return None
        return ChunkKV(tensors["token_ids"], tensors["keys"], tensors["values"])


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors buffer: its header is a little-endian u64 length, then that many
    bytes of JSON (the format's specification); safetensors' `load` reads the tensors only."""
    (length,) = struct.unpack_from("<Q", body)
    return json.loads(body[8:8 + length]).get("__metadata__") or {}


class Tier(ABC):
    """One storage level. Not thread-safe on its own: the store serialises access."""

    def __init__(self, name: str, budget_bytes: int) -> None:
        self.name = name
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[ChunkKey, EntryInfo] = OrderedDict()  # least recently used first
        self.used_bytes = 0

    def admit(self, key: ChunkKey, info: EntryInfo) -> None:
        self.forget(key)
        self.entries[key] = info
        self.used_bytes += info.nbytes

    def forget(self, key: ChunkKey) -> EntryInfo | None:
        info = self.entries.pop(key, None)
        if info is not None:
            self.used_bytes -= info.nbytes
        return info

    @abstractmethod
    def read(self, key: ChunkKey) -> ChunkKV | None: ...

    @abstractmethod
    def write(self, key: ChunkKey, kv: ChunkKV) -> int:
        """Stores the entry; returns the bytes it takes in this tier."""

    @abstractmethod
    def remove(self, key: ChunkKey) -> None: ...


class MemoryTier(Tier):
    """Tensors kept in GPU or CPU memory (pinned on the CPU when there is a GPU, for fast copies up)."""

    def __init__(self, name: str, budget_bytes: int, device: str | torch.device) -> None:
        super().__init__(name, budget_bytes)
        self.device = torch.device(device)
        self._data: dict[ChunkKey, ChunkKV] = {}
        self._pin = self.device.type == "cpu" and torch.cuda.is_available()

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        # From pinned memory the copy to the GPU is queued, not waited for (the host allocator keeps the source
        # alive until it is done).
        tensor = tensor.to(self.device, non_blocking=tensor.is_pinned())
        return tensor.pin_memory() if self._pin else tensor

    def read(self, key: ChunkKey) -> ChunkKV | None:
        return self._data.get(key)

    def write(self, key: ChunkKey, kv: ChunkKV) -> int:
        # Token ids stay on the host: blending reads them there, and a GPU copy would make it wait.
        stored = ChunkKV(kv.token_ids.cpu(), self._place(kv.keys), self._place(kv.values))
        self._data[key] = stored
        return stored.nbytes

    def remove(self, key: ChunkKey) -> None:
        self._data.pop(key, None)


class DiskTier(Tier):
    """Files in a folder, written to a temporary name and renamed; checked on every read."""

    def __init__(self, name: str, budget_bytes: int, directory: Path, codec: Codec | None = None) -> None:
        super().__init__(name, budget_bytes)
        self.directory = directory
        self.codec = codec or Codec()
        directory.mkdir(parents=True, exist_ok=True)
        self.corrupt = 0
        self._sizes: dict[str, int] = {}
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
        kv = self.codec.decode(key, data)
        if kv is None:
            self.corrupt += 1
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


@dataclass
class CacheStats:
    hits: dict[str, int] = field(default_factory=dict)  # by tier
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=dict)  # entries pushed out of each tier
    corrupt: int = 0


class ChunkCacheStore:
    def __init__(self, tiers: list[Tier]) -> None:
        if not tiers:
            raise ValueError("the chunk-cache store needs at least one tier")
        self.tiers = tiers
        self.stats = CacheStats(hits={t.name: 0 for t in tiers}, evictions={t.name: 0 for t in tiers})
        self._lock = threading.RLock()

    def contains(self, key: ChunkKey) -> bool:
        """Whether a tier holds the entry (nothing read, no statistics counted)."""
        with self._lock:
            return any(key in tier.entries for tier in self.tiers)

    def get(self, key: ChunkKey, promote: bool = True) -> ChunkKV | None:
        """The entry from the fastest tier holding it. With promote=False an entry found in a lower tier stays
        there for now (call `promote` later): blending streams CPU-memory entries up layer by layer, and a
        promotion copy queued before it would hold the prefill up."""
        with self._lock:
            for level, tier in enumerate(self.tiers):
                info = tier.entries.get(key)
                if info is None:
                    continue
                kv = tier.read(key)
                if kv is None:  # damaged: dropped by the tier; recomputing it is the caller's miss
                    tier.forget(key)
                    self.stats.corrupt += 1
                    break
                info.hits += 1
                self.stats.hits[tier.name] += 1
                tier.entries.move_to_end(key)
                if level > 0 and promote:
                    self._insert(0, key, kv, info)
                return kv
            self.stats.misses += 1
            return None

    def promote(self, key: ChunkKey, kv: ChunkKV) -> None:
        """Move an entry that `get(promote=False)` found in a lower tier (as `kv`, so it is not read twice) to
        the top tier; nothing happens when it is at the top already or no longer stored."""
        with self._lock:
            if key in self.tiers[0].entries:
                return
            for tier in self.tiers[1:]:
                info = tier.entries.get(key)
                if info is not None:
                    self._insert(0, key, kv, info)
                    return

    def put(self, key: ChunkKey, kv: ChunkKV, recompute_cost: float) -> None:
        with self._lock:
            self._insert(0, key, kv, EntryInfo(nbytes=0, recompute_cost=recompute_cost))

    def _insert(self, level: int, key: ChunkKey, kv: ChunkKV, info: EntryInfo) -> None:
        tier = self.tiers[level]
        info = EntryInfo(nbytes=tier.write(key, kv), recompute_cost=info.recompute_cost, hits=info.hits)
        if info.nbytes > tier.budget_bytes:  # larger than the whole tier: try the next one
            tier.remove(key)
            if level + 1 < len(self.tiers):
                self._insert(level + 1, key, kv, info)
            return
        tier.admit(key, info)
        while tier.used_bytes > tier.budget_bytes:
            victim = next(iter(tier.entries))
            victim_info = tier.forget(victim)
            victim_kv = tier.read(victim)
            tier.remove(victim)
            self.stats.evictions[tier.name] += 1
            if victim_kv is not None and level + 1 < len(self.tiers) and victim not in self.tiers[level + 1].entries:
                self._insert(level + 1, victim, victim_kv, victim_info)

    def report(self) -> dict:
        with self._lock:
            return {
                "tiers": [{"name": t.name, "entries": len(t.entries), "bytes": t.used_bytes,
                           "budget_bytes": t.budget_bytes, "hits": self.stats.hits[t.name],
                           "evictions": self.stats.evictions[t.name]} for t in self.tiers],
                "misses": self.stats.misses, "corrupt": self.stats.corrupt,
            }


    def entries(self) -> list[dict]:
        """Every entry (chunk token digest, tier, bytes, hits), for operators."""
        with self._lock:
            return [{"chunk": key.tokens, "tier": tier.name, "bytes": info.nbytes, "hits": info.hits,
                     "recompute_cost": info.recompute_cost}
                    for tier in self.tiers for key, info in tier.entries.items()]


def model_fingerprint(model) -> str:
    """Identifies a model by its configuration and a sample of its weights, not by a name."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for tensor in (model.embed_tokens, model.lm_head, model.layers[0].qkv, model.layers[-1].qkv):
        digest.update(tensor.flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
