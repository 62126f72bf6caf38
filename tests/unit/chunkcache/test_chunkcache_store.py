"""The chunk-cache store: tiers, budgets, LRU demotion and promotion, persistence, corruption, keys."""

from __future__ import annotations

import torch
from blendgate.chunkcache.keys import ChunkKey, model_fingerprint
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.tiers import DiskTier, MemoryTier
from chunk_entries import key, kv

ENTRY = kv(0).nbytes  # bytes of one entry in memory


def assert_same(a: ChunkKV | None, b: ChunkKV) -> None:
    assert a is not None
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_lru_entries_move_down_the_tiers_and_hits_come_back_up(tmp_path) -> None:
    memory = MemoryTier("cpu", budget_bytes=2 * ENTRY, device="cpu")
    disk = DiskTier("disk", budget_bytes=10 * ENTRY, directory=tmp_path)
    store = ChunkCacheStore([memory, disk])
    for n in range(4):
        store.put(key(n), kv(n), recompute_cost=8)
    assert set(memory.entries) == {key(2), key(3)}
    assert {key(0), key(1)} <= set(disk.entries)
    assert store.stats.evictions["cpu"] == 2
    assert_same(store.get(key(0)), kv(0))  # from disk, and promoted
    assert key(0) in memory.entries and store.stats.hits["disk"] == 1
    assert_same(store.get(key(0)), kv(0))
    assert store.stats.hits["cpu"] == 1
    assert store.get(key(99)) is None and store.stats.misses == 1
    report = store.report()
    assert report["tiers"][0]["bytes"] <= 2 * ENTRY and report["misses"] == 1


def test_a_hit_can_wait_for_its_promotion(tmp_path) -> None:
    store = ChunkCacheStore([MemoryTier("cpu", budget_bytes=2 * ENTRY, device="cpu"),
                             DiskTier("disk", budget_bytes=10 * ENTRY, directory=tmp_path)])
    for n in range(3):
        store.put(key(n), kv(n), recompute_cost=8)
    assert key(0) not in store.tiers[0].entries
    found = store.get(key(0), promote=False)
    assert_same(found, kv(0))  # read where it lies (blending streams it up)
    assert key(0) not in store.tiers[0].entries and store.stats.hits["disk"] == 1
    store.promote(key(0), found)
    assert key(0) in store.tiers[0].entries
    assert_same(store.get(key(0)), kv(0))
    store.promote(key(0), found)  # already at the top: nothing changes
    store.promote(key(42), kv(42))  # unknown: nothing happens
    assert len(store.tiers[0].entries) == 2


def test_last_tier_drops_and_budgets_hold(tmp_path) -> None:
    store = ChunkCacheStore([MemoryTier("cpu", budget_bytes=ENTRY, device="cpu"),
                             DiskTier("disk", budget_bytes=2 * ENTRY + 400, directory=tmp_path)])
    for n in range(6):
        store.put(key(n), kv(n), recompute_cost=8)
    for tier in store.tiers:
        assert tier.used_bytes <= tier.budget_bytes
    assert store.get(key(0)) is None  # dropped from the last tier
    assert len(list(tmp_path.glob("*.kv"))) == len(store.tiers[1].entries)


def test_disk_entries_survive_a_restart(tmp_path) -> None:
    ChunkCacheStore([DiskTier("disk", budget_bytes=1 << 20, directory=tmp_path)]).put(key(1), kv(1), 8)
    reopened = ChunkCacheStore([MemoryTier("cpu", 1 << 20, "cpu"), DiskTier("disk", 1 << 20, directory=tmp_path)])
    assert_same(reopened.get(key(1)), kv(1))


def test_a_corrupt_entry_is_a_miss_and_is_removed(tmp_path) -> None:
    store = ChunkCacheStore([DiskTier("disk", budget_bytes=1 << 20, directory=tmp_path)])
    store.put(key(1), kv(1), 8)
    path = next(tmp_path.glob("*.kv"))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.get(key(1)) is None
    assert store.stats.corrupt == 1 and not path.exists()
    store.put(key(1), kv(1), 8)  # recomputed and stored again
    assert_same(store.get(key(1)), kv(1))


def test_a_valid_entry_of_another_chunk_copied_over_a_file_is_damaged(tmp_path) -> None:
    store = ChunkCacheStore([DiskTier("disk", budget_bytes=1 << 20, directory=tmp_path)])
    store.put(key(1), kv(1), 8)
    store.put(key(2), kv(2), 8)
    victim = tmp_path / f"{key(1).name}.kv"
    victim.write_bytes((tmp_path / f"{key(2).name}.kv").read_bytes())  # checksum fine, but chunk 2's entry
    assert store.get(key(1)) is None
    assert store.stats.corrupt == 1 and not victim.exists() and key(1) not in store.tiers[0].entries
    assert_same(store.get(key(2)), kv(2))  # the original is untouched
    store.put(key(1), kv(1), 8)  # recomputed and stored again
    assert_same(store.get(key(1)), kv(1))


def test_an_entry_of_another_model_with_the_same_tokens_is_damaged(tmp_path) -> None:
    """Same chunk tokens, another model: only the key stored in the file tells them apart."""
    ChunkCacheStore([DiskTier("disk", 1 << 20, directory=tmp_path)]).put(key(1, model="aaaa"), kv(1), 8)
    (tmp_path / f"{key(1, model='bbbb').name}.kv").write_bytes(
        (tmp_path / f"{key(1, model='aaaa').name}.kv").read_bytes())
    reopened = ChunkCacheStore([DiskTier("disk", 1 << 20, directory=tmp_path)])  # finds both files
    assert reopened.get(key(1, model="bbbb")) is None
    assert reopened.stats.corrupt == 1 and not (tmp_path / f"{key(1, model='bbbb').name}.kv").exists()
    assert_same(reopened.get(key(1, model="aaaa")), kv(1))


def test_keys_separate_models_prefixes_and_tokens() -> None:
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 20, "cpu")])
    store.put(key(1, model="model-a"), kv(1), 8)
    assert store.get(key(1, model="model-b")) is None
    assert store.get(ChunkKey.of("model-a", [9], [1, 2])) is None
    assert store.get(key(1, model="model-a")) is not None


def test_an_entry_larger_than_a_tier_goes_to_the_next(tmp_path) -> None:
    store = ChunkCacheStore([MemoryTier("gpu", budget_bytes=ENTRY // 2, device="cpu"),
                             DiskTier("disk", 1 << 20, directory=tmp_path)])
    store.put(key(1), kv(1), 8)
    assert not store.tiers[0].entries and key(1) in store.tiers[1].entries


def test_model_fingerprints_follow_the_weights() -> None:
    from blendgate.engine.llama import LlamaFamilyModel
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    first = LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32, seed=1)
    same = LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32, seed=1)
    other = LlamaFamilyModel.random(config, device="cpu", dtype=torch.float32, seed=2)
    assert model_fingerprint(first) == model_fingerprint(same) != model_fingerprint(other)


def test_a_chunks_measured_sensitivity_is_averaged_in_its_entry_and_moves_with_it(tmp_path) -> None:
    store = ChunkCacheStore([MemoryTier("cpu", budget_bytes=ENTRY, device="cpu"),
                             DiskTier("disk", budget_bytes=10 * ENTRY, directory=tmp_path)])
    store.put(key(0), kv(0), recompute_cost=8)
    assert store.entries()[0]["sensitivity"] is None  # not measured yet
    store.note_sensitivity(key(0), 0.4)
    store.note_sensitivity(key(0), 0.8)
    assert abs(store.entries()[0]["sensitivity"] - 0.5) < 1e-9  # 0.75 * 0.4 + 0.25 * 0.8
    for bad in (float("nan"), float("inf"), -1.0):
        store.note_sensitivity(key(0), bad)
    store.note_sensitivity(key(7), 0.3)  # not stored: nothing happens
    store.put(key(1), kv(1), recompute_cost=8)  # moves key(0) to disk
    moved = {entry["tier"]: entry for entry in store.entries()}["disk"]
    assert abs(moved["sensitivity"] - 0.5) < 1e-9
