"""Eviction policies of the chunk-cache store, on the CPU: the policies alone (plain Python) and in a store of a
memory tier over a disk tier (the cost-aware policy keeps what saves the most prefill per byte)."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
import torch
from blendgate.chunkcache.eviction import (
    EVICTION_POLICIES,
    CostAwarePolicy,
    EntryInfo,
    EvictionPolicyName,
    LRUPolicy,
    eviction_policy,
)
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.tiers import DiskTier, MemoryTier


def test_policies_are_picked_by_name_and_the_setting_lists_each() -> None:
    assert set(EVICTION_POLICIES) == set(get_args(EvictionPolicyName)) == {"lru", "cost_aware"}
    assert isinstance(eviction_policy("lru"), LRUPolicy)
    assert isinstance(eviction_policy("cost_aware"), CostAwarePolicy)
    with pytest.raises(ValueError, match="known: lru, cost_aware"):
        eviction_policy("fifo")


def test_lru_takes_the_least_recently_used() -> None:
    entries = {"old": EntryInfo(nbytes=10, recompute_cost=1000.0, hits=9), "new": EntryInfo(10, 1.0)}
    assert LRUPolicy().victim(entries) == "old"


def test_cost_aware_takes_the_least_cost_times_hits_per_byte() -> None:
    policy = CostAwarePolicy()
    entries = {
        "cheap": EntryInfo(nbytes=100, recompute_cost=10.0),  # 0.1 per byte
        "costly": EntryInfo(nbytes=100, recompute_cost=500.0),  # 5
        "often_hit": EntryInfo(nbytes=100, recompute_cost=8.0, hits=4),  # 0.4
        "large": EntryInfo(nbytes=10_000, recompute_cost=500.0),  # 0.05
    }
    assert policy.victim(entries) == "large"
    del entries["large"]
    assert policy.victim(entries) == "cheap"
    entries["cheap"].hits = 9  # now 1.0 per byte: the often-hit one (0.4) goes first
    assert policy.victim(entries) == "often_hit"


def test_cost_aware_ties_go_to_the_least_recently_used_and_unknown_costs_go_first() -> None:
    policy = CostAwarePolicy()
    assert policy.victim({"a": EntryInfo(8, 80.0), "b": EntryInfo(8, 80.0)}) == "a"
    # An entry found on disk from an earlier run has no recorded cost (0): it leaves before any priced one.
    assert policy.victim({"priced": EntryInfo(8, 1.0), "from_disk": EntryInfo(8, 0.0)}) == "from_disk"


def test_the_policy_modules_import_no_torch() -> None:
    code = ("import sys, blendgate.chunkcache.eviction, blendgate.chunkcache.keys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def kv(seed: int, tokens: int = 8) -> ChunkKV:
    generator = torch.Generator().manual_seed(seed)
    return ChunkKV(torch.randint(0, 100, (tokens,), generator=generator),
                   torch.randn(2, 2, tokens, 4, generator=generator), torch.randn(2, 2, tokens, 4, generator=generator))


def key(n: int) -> ChunkKey:
    return ChunkKey.of("m", [1, 2], kv(n).token_ids.tolist())


ENTRY = kv(0).nbytes


@pytest.mark.parametrize("eviction, demoted", [("lru", 0), ("cost_aware", 1)])
def test_a_full_tier_moves_down_what_its_policy_picks(tmp_path, eviction: str, demoted: int) -> None:
    """Chunk 0 costs much to recompute, chunk 1 little: LRU moves chunk 0 down (least recently used), the
    cost-aware policy chunk 1 (least cost per byte). Either way the entry stays readable from disk."""
    memory = MemoryTier("cpu", budget_bytes=2 * ENTRY, device="cpu")
    disk = DiskTier("disk", budget_bytes=10 * ENTRY, directory=tmp_path)
    store = ChunkCacheStore([memory, disk], eviction=eviction)
    store.put(key(0), kv(0), recompute_cost=800)
    store.put(key(1), kv(1), recompute_cost=8)
    store.put(key(2), kv(2), recompute_cost=400)
    kept = {0, 1, 2} - {demoted}
    assert set(memory.entries) == {key(n) for n in kept}
    assert key(demoted) in disk.entries and store.stats.evictions["cpu"] == 1
    assert torch.equal(store.get(key(demoted), promote=False).keys, kv(demoted).keys)


def test_hits_keep_a_cheap_chunk_in_the_cost_aware_store(tmp_path) -> None:
    memory = MemoryTier("cpu", budget_bytes=2 * ENTRY, device="cpu")
    store = ChunkCacheStore([memory, DiskTier("disk", 10 * ENTRY, directory=tmp_path)], eviction="cost_aware")
    store.put(key(0), kv(0), recompute_cost=100)
    store.put(key(1), kv(1), recompute_cost=30)
    for _ in range(5):  # 30 x 6 > 100 x 1
        assert store.get(key(1)) is not None
    store.put(key(2), kv(2), recompute_cost=150)
    assert set(memory.entries) == {key(1), key(2)}


def test_the_policy_is_a_setting_of_the_gateway_and_of_the_plugin(monkeypatch) -> None:
    from blendgate.gateway.config import ChunkCacheSettings
    from blendgate.sglang_plugin.settings import PluginSettings
    from pydantic import ValidationError

    assert ChunkCacheSettings().eviction == PluginSettings.from_env().eviction == "lru"
    assert ChunkCacheSettings(eviction="cost_aware").eviction == "cost_aware"
    with pytest.raises(ValidationError):
        ChunkCacheSettings(eviction="fifo")
    monkeypatch.setenv("BLENDGATE_SGLANG_EVICTION", "cost_aware")
    assert PluginSettings.from_env().eviction == "cost_aware"
    monkeypatch.setenv("BLENDGATE_SGLANG_EVICTION", "fifo")
    with pytest.raises(ValueError, match="BLENDGATE_SGLANG_EVICTION"):
        PluginSettings.from_env()
