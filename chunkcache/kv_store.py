"""The chunk-KV store: chunk KV in tiers (GPU memory, CPU memory, disk), fastest first.

Looked up by ChunkKey (keys.py). Each tier (tiers.py) has a byte budget; a tier over budget moves entries down
one tier, the eviction policy (eviction.py: "lru" by default, or "cost_aware") choosing which, and the last
tier drops them. A hit in a lower tier is promoted to the top. Entries record their hits and recompute cost,
which the cost-aware policy weighs. A damaged disk entry is deleted, counted as corrupt and reported as a miss,
never used.

Optionally a shared tier (redis_tier.py: RedisTier) sits beside the local ones: looked up on a local miss (its
hit promoted into the top tier as a lower tier's is) and written through on every `put`, so a chunk computed
by one replica is a hit for the others. It is called outside the store's lock: a slow Redis holds up only the
lookup that waits for it.

With a fetch policy (adaptation.py: FetchPolicy, bandwidth adaptation) the caller asks `locate` before it reads:
per chunk, whether a local tier holds it, else the shared tier's entry size and the policy's choice between
fetching it and recomputing it; a chunk to recompute is not read from Redis (`get` with shared=False;
`note_recomputed` counts it, and `put` with share=False does not write it to Redis again).
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

from cachetools import LRUCache

from .adaptation import FetchDecision, FetchPolicy
from .eviction import DEFAULT_EVICTION, EntryInfo, EvictionPolicy, eviction_policy
from .keys import ChunkKey
from .kv import ChunkKV
from .redis_tier import RedisTier
from .tiers import DiskTier, Tier

# Shared-tier hits waiting for `promote` (get with promote=False); bounded, should a caller never promote.
PENDING_PROMOTIONS = 1024


@dataclass
class CacheStats:
    hits: dict[str, int] = field(default_factory=dict)  # by tier
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=dict)  # entries pushed out of each tier
    corrupt: int = 0
    shared_recomputed: int = 0  # shared-tier entries recomputed instead, the fetch policy's choice


@dataclass(frozen=True)
class ChunkSource:
    """Where one chunk's KV would come from, between the store (`locate`) and the blender (runner.py):
    `local` when a local tier holds it, else `shared_bytes`, its entry's encoded size in the shared tier (None:
    no tier holds it), and `decision`, the fetch policy's choice for that entry (None without a policy: fetch)."""

    local: bool
    shared_bytes: int | None = None
    decision: FetchDecision | None = None

    @property
    def hit(self) -> bool:
        """Whether the chunk's KV will be read rather than computed."""
        return self.local or (self.shared_bytes is not None and (self.decision is None or self.decision.fetch))


class ChunkCacheStore:
    """Thread-safe: one lock around every operation (the engine's worker thread and the gateway's reports)."""

    def __init__(self, tiers: list[Tier], eviction: EvictionPolicy | str = DEFAULT_EVICTION,
                 shared: RedisTier | None = None, adaptation: FetchPolicy | None = None) -> None:
        if not tiers:
            raise ValueError("the chunk-cache store needs at least one tier")
        self.tiers = tiers
        self.shared = shared
        self.adaptation = adaptation if shared is not None else None
        self.eviction = eviction_policy(eviction) if isinstance(eviction, str) else eviction
        self.stats = CacheStats(hits={t.name: 0 for t in tiers}, evictions={t.name: 0 for t in tiers})
        self._from_shared: LRUCache[ChunkKey, bool] = LRUCache(PENDING_PROMOTIONS)
        self._lock = threading.RLock()

    @property
    def encodes_with_channel_weights(self) -> bool:
        """Whether a tier encodes entries with a codec that spends its bits by the chunk's ChannelWeights (the
        disk tier's or the shared tier's: codec.KVCodec.uses_channel_weights)."""
        codecs = [tier.codec for tier in self.tiers if isinstance(tier, DiskTier)]
        codecs += [self.shared.codec] if self.shared is not None else []
        return any(codec.kv_codec.uses_channel_weights for codec in codecs)

    def contains(self, key: ChunkKey) -> bool:
        """Whether a tier holds the entry (nothing read, no statistics counted); see `contains_all`."""
        return self.contains_all([key])[0]

    def contains_all(self, keys: list[ChunkKey]) -> list[bool]:
        """Whether a tier holds each entry (nothing read, no statistics counted); the shared tier is asked,
        in one round trip, about those no local tier holds."""
        with self._lock:
            found = [any(key in tier.entries for tier in self.tiers) for key in keys]
        missing = [key for key, held in zip(keys, found) if not held]
        if self.shared is None or not missing:
            return found
        shared = iter(self.shared.contains(missing))
        return [held or next(shared) for held in found]

    def locate(self, keys: list[ChunkKey], tokens: list[int]) -> list[ChunkSource]:
        """Where each chunk's KV would come from (nothing read, no statistics counted): the local tiers, else the
        shared tier, asked in one round trip for the sizes of the entries no local tier holds, with the fetch
        policy's choice for each (`tokens`: each chunk's token count)."""
        if len(keys) != len(tokens):
            raise ValueError("one token count per key is needed")
        with self._lock:
            local = [any(key in tier.entries for tier in self.tiers) for key in keys]
        missing = [key for key, held in zip(keys, local) if not held]
        sizes = iter(self.shared.entry_sizes(missing) if self.shared is not None and missing else [])
        sources = []
        for held, count in zip(local, tokens):
            size = None if held else next(sizes, None)
            decision = self.adaptation.decide(size, count) if size is not None and self.adaptation else None
            sources.append(ChunkSource(held, size, decision))
        return sources

    def note_recomputed(self) -> None:
        """Count a chunk the shared tier held but the fetch policy chose to recompute (its miss is counted by
        `get(..., shared=False)`)."""
        with self._lock:
            self.stats.shared_recomputed += 1

    def get(self, key: ChunkKey, promote: bool = True, shared: bool = True) -> ChunkKV | None:
        """The entry from the fastest tier holding it, else from the shared tier (decoded, on the host; not
        asked with shared=False: the fetch policy chose to recompute). With promote=False an entry found in a
        lower tier (or the shared one) stays there for now (call `promote` later): blending streams CPU-memory
        entries up layer by layer, and a promotion copy queued before it would hold the prefill up."""
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
                tier.touch(key)
                if level > 0 and promote:
                    self._insert(0, key, kv, info)
                return kv
        kv = self.shared.read(key) if self.shared is not None and shared else None  # outside the lock
        with self._lock:
            if kv is None:
                self.stats.misses += 1
                return None
            if promote:  # the hit is counted by the shared tier (its report)
                self._insert(0, key, kv, self._shared_info(kv))
            else:
                self._from_shared[key] = True
            return kv

    @staticmethod
    def _shared_info(kv: ChunkKV) -> EntryInfo:
        """A shared-tier hit's local bookkeeping: its recompute cost as `put` records it (tokens x layers)."""
        return EntryInfo(nbytes=0, recompute_cost=float(kv.length * kv.keys.shape[0]), hits=1)

    def promote(self, key: ChunkKey, kv: ChunkKV) -> None:
        """Move an entry that `get(promote=False)` found in a lower tier (as `kv`, so it is not read twice) to
        the top tier (or, from the shared tier, into it); nothing happens when it is at the top already or no
        longer stored."""
        with self._lock:
            from_shared = self._from_shared.pop(key, False)
            if key in self.tiers[0].entries:
                return
            for tier in self.tiers[1:]:
                info = tier.entries.get(key)
                if info is not None:
                    self._insert(0, key, kv, info)
                    return
            if from_shared:
                self._insert(0, key, kv, self._shared_info(kv))

    def put(self, key: ChunkKey, kv: ChunkKV, recompute_cost: float, share: bool = True) -> None:
        """Stores a chunk's KV just computed in the top tier. recompute_cost: what computing it again costs (the
        chunk's tokens times the model's layers), for the cost-aware eviction policy. Also queued for the shared
        tier, when there is one and `share` (False: it holds the entry already, see `locate`)."""
        with self._lock:
            self._insert(0, key, kv, EntryInfo(nbytes=0, recompute_cost=recompute_cost))
        if self.shared is not None and share:
            self.shared.write(key, kv)

    SENSITIVITY_WEIGHT = 0.25  # the newest measurement's share in an entry's running sensitivity

    def note_sensitivity(self, key: ChunkKey, drift: float) -> None:
        """Record a blend's measured drift of this chunk (BlendResult.chunk_drift) in its entry, as an exponential
        average (Cache-Craft's per-chunk sensitivity: later requests and operators read it from `entries()`).
        Nothing happens for an entry no longer stored or a value that is not a finite, non-negative number."""
        if not (math.isfinite(drift) and drift >= 0.0):
            return
        with self._lock:
            for tier in self.tiers:
                info = tier.entries.get(key)
                if info is not None:
                    info.sensitivity = drift if info.sensitivity is None else (
                        (1 - self.SENSITIVITY_WEIGHT) * info.sensitivity + self.SENSITIVITY_WEIGHT * drift)
                    return

    def _insert(self, level: int, key: ChunkKey, kv: ChunkKV, info: EntryInfo) -> None:
        tier = self.tiers[level]
        info = EntryInfo(nbytes=tier.write(key, kv), recompute_cost=info.recompute_cost, hits=info.hits,
                         sensitivity=info.sensitivity)
        if info.nbytes > tier.budget_bytes:  # larger than the whole tier: try the next one
            tier.remove(key)
            if level + 1 < len(self.tiers):
                self._insert(level + 1, key, kv, info)
            return
        tier.admit(key, info)
        while tier.used_bytes > tier.budget_bytes:
            victim = self.eviction.victim(tier.entries)
            victim_info = tier.forget(victim)
            victim_kv = tier.read(victim)
            tier.remove(victim)
            self.stats.evictions[tier.name] += 1
            if victim_kv is not None and level + 1 < len(self.tiers) and victim not in self.tiers[level + 1].entries:
                self._insert(level + 1, victim, victim_kv, victim_info)

    def report(self) -> dict:
        """Per tier: entries, bytes, budget_bytes, hits, evictions; the shared tier last, with `shared: true`
        and its own fields (RedisTierReport: up, down_reason, corrupt, ...); with a fetch policy, `adaptation`:
        its estimates (AdaptationReport) and `recomputed`, the shared entries it chose to recompute. Makes no
        Redis call."""
        with self._lock:
            tiers = [{"name": t.name, "entries": len(t.entries), "bytes": t.used_bytes,
                      "budget_bytes": t.budget_bytes, "hits": self.stats.hits[t.name],
                      "evictions": self.stats.evictions[t.name]} for t in self.tiers]
            report = {"tiers": tiers, "misses": self.stats.misses, "corrupt": self.stats.corrupt}
            recomputed = self.stats.shared_recomputed
        if self.shared is not None:
            tiers.append({**self.shared.report().as_dict(), "shared": True})
        if self.adaptation is not None:
            report["adaptation"] = {**asdict(self.adaptation.report()), "recomputed": recomputed}
        return report

    def close(self) -> None:
        """Let the shared tier's queued writes finish and close its connections (local tiers need nothing)."""
        if self.shared is not None:
            self.shared.close()

    def entries(self) -> list[dict]:
        """Every entry (chunk token digest, tier, bytes, hits, recompute cost, sensitivity), for operators."""
        with self._lock:
            return [{"chunk": key.tokens, "tier": tier.name, "bytes": info.nbytes, "hits": info.hits,
                     "recompute_cost": info.recompute_cost, "sensitivity": info.sensitivity}
                    for tier in self.tiers for key, info in tier.entries.items()]
