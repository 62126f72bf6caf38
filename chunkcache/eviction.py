"""Eviction policies of the chunk-cache store: which entry a tier over its byte budget moves down next.

Plain Python (no torch), picked by name (`chunk_cache.eviction`, like LMCache's cache_policy):
- "lru" (the default): the least recently used entry;
- "cost_aware" (in the spirit of Cache-Craft, arXiv 2502.15734): the entry whose recorded recompute cost times
  hits is least per byte it takes, i.e. the one whose bytes save the least prefill compute; ties go to the
  least recently used. Hits count from one, so an entry not hit yet still weighs its recompute cost.

A policy only chooses; the store (kv_store.py) moves the victim down a tier or drops it from the last one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Hashable, Literal, Mapping, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class EntryInfo:
    """What a tier records of one entry: the hand-off between a tier's bookkeeping (tiers.py) and the eviction
    policy that reads it."""

    nbytes: int  # bytes the entry takes in its tier
    recompute_cost: float  # what a miss costs: the chunk's prefill, in tokens times layers (0: not known)
    hits: int = 0  # lookups that found it, in any tier
    # How much the chunk's KV moves with its context when blended (Cache-Craft's sensitivity): an exponential
    # average of BlendResult.chunk_drift over the blends that measured it; None until one did.
    sensitivity: float | None = None


class EvictionPolicy(ABC):
    """Chooses the victim among a tier's entries. Stateless: the tier keeps the recency order."""

    name: ClassVar[str]

    @abstractmethod
    def victim(self, entries: Mapping[K, EntryInfo]) -> K:
        """The entry to move out next. `entries`: a tier's entries, least recently used first, never empty."""


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def victim(self, entries: Mapping[K, EntryInfo]) -> K:
        return next(iter(entries))


class CostAwarePolicy(EvictionPolicy):
    """Keeps the bytes that save the most prefill: score = recompute_cost x (hits + 1) / bytes, lowest out.
    A scan over the tier's entries per eviction (a tier holds thousands of chunks, not millions)."""

    name = "cost_aware"

    @staticmethod
    def score(info: EntryInfo) -> float:
        return info.recompute_cost * (info.hits + 1) / max(info.nbytes, 1)

    def victim(self, entries: Mapping[K, EntryInfo]) -> K:
        # min() keeps the first of equal scores: the least recently used.
        return min(entries, key=lambda key: self.score(entries[key]))


EvictionPolicyName = Literal["lru", "cost_aware"]
EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {policy.name: policy for policy in (LRUPolicy, CostAwarePolicy)}
DEFAULT_EVICTION: EvictionPolicyName = "lru"


def eviction_policy(name: str) -> EvictionPolicy:
    """The policy of that name; ValueError naming the known ones otherwise."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(EVICTION_POLICIES)}") from None
