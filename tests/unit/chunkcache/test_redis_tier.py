"""The shared chunk-cache tier on a real Redis server: two stores ("replicas") sharing one Redis, the shared byte
budget and its eviction, damaged entries, and Redis down (killed, hung) with the circuit breaker."""

from __future__ import annotations

import time
import uuid

import pytest
import torch
from blendgate.chunkcache.codec import Codec
from blendgate.chunkcache.keys import ChunkKey
from blendgate.chunkcache.kv import ChunkKV
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.redis_tier import CircuitBreaker, RedisTier
from blendgate.chunkcache.tiers import MemoryTier
from chunk_entries import key, kv

ENCODED = len(Codec().encode(key(0), kv(0)))  # bytes of one entry in Redis


def assert_same(a: ChunkKV | None, b: ChunkKV) -> None:
    assert a is not None
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.fixture
def prefix() -> str:
    """Each test's own key prefix on the session's Redis."""
    return f"test:chunk-kv:{uuid.uuid4().hex[:8]}"


def replica(url: str, prefix: str, budget: int = 100 * ENCODED, local: int = 100 * ENCODED, **options):
    """One replica's store: a CPU-memory tier of its own and the shared tier."""
    shared = RedisTier(url, budget, key_prefix=prefix, timeout_s=0.5, **options)
    return ChunkCacheStore([MemoryTier("cpu", local, "cpu")], shared=shared)


def test_an_entry_put_by_one_replica_is_a_hit_for_another(redis_server, prefix) -> None:
    first, second = replica(redis_server.url, prefix), replica(redis_server.url, prefix)
    try:
        first.put(key(0), kv(0), recompute_cost=16)
        first.shared.flush()
        assert second.contains(key(0)) and second.contains_all([key(99), key(0)]) == [False, True]
        found = second.get(key(0), promote=False)
        assert_same(found, kv(0))
        assert key(0) not in second.tiers[0].entries  # waits for its promotion, as a lower tier's hit
        second.promote(key(0), found)
        info = second.tiers[0].entries[key(0)]
        assert info.recompute_cost == 16.0  # 8 tokens x 2 layers, as `put` records it
        assert_same(second.get(key(0)), kv(0))  # now from its own memory
        shared = second.report()["tiers"][-1]
        assert shared["name"] == "redis" and shared["shared"] and shared["up"] and shared["hits"] == 1
        assert (shared["entries"], shared["bytes"]) == (1, ENCODED)  # the whole tier's, as its read saw it
        assert second.report()["tiers"][0]["hits"] == 1 and second.stats.misses == 0
        # Stored once: the second replica's put of the same chunk only marks it used.
        second.put(key(0), kv(0), recompute_cost=16)
        second.shared.flush()
        assert first.report()["tiers"][-1]["writes"] == 1 and second.report()["tiers"][-1]["writes"] == 0
        assert second.report()["tiers"][-1]["entries"] == 1
        assert second.get(key(99)) is None and second.stats.misses == 1
    finally:
        first.close()
        second.close()


def test_the_byte_budget_is_shared_and_least_recently_used_entries_go(redis_server, prefix) -> None:
    first = replica(redis_server.url, prefix, budget=3 * ENCODED)
    second = replica(redis_server.url, prefix, budget=3 * ENCODED)
    client = redis_server.client()
    try:
        for n in range(3):
            first.put(key(n), kv(n), recompute_cost=16)
        first.shared.flush()
        time.sleep(0.01)
        assert second.shared.read(key(0)) is not None  # key(0) is now the most recently used
        second.put(key(3), kv(3), recompute_cost=16)  # the fourth entry, by the other replica: one must go
        second.shared.flush()
        assert second.shared.read(key(1)) is None  # the least recently used
        for n in (0, 2, 3):
            assert_same(first.shared.read(key(n)), kv(n))
        report = second.report()["tiers"][-1]
        assert report["evictions"] == 1 and report["entries"] == 3 and report["bytes"] == 3 * ENCODED
        assert int(client.get(f"{prefix}:bytes")) == 3 * ENCODED and client.zcard(f"{prefix}:lru") == 3
        assert not client.exists(f"{prefix}:kv:raw0.{key(1).name}")
        # An entry larger than the whole budget is not stored (and evicts nothing).
        big = ChunkKV(torch.arange(64), torch.randn(2, 2, 64, 4), torch.randn(2, 2, 64, 4))
        big_key = ChunkKey.of("m", [1, 2], big.token_ids.tolist())
        assert not second.shared.write_now(big_key, big)
        assert client.zcard(f"{prefix}:lru") == 3
    finally:
        first.close()
        second.close()


def test_a_damaged_or_mismatched_entry_is_a_miss_and_is_deleted(redis_server, prefix) -> None:
    store = replica(redis_server.url, prefix)
    client = redis_server.client()
    try:
        store.shared.write_now(key(0), kv(0))
        store.shared.write_now(key(1), kv(1))
        entry = f"{prefix}:kv:raw0.{key(0).name}"
        data = bytearray(client.get(entry))
        data[-5] ^= 0xFF
        client.set(entry, bytes(data))
        # Another chunk's valid entry under key(1)'s name.
        client.set(f"{prefix}:kv:raw0.{key(1).name}", Codec().encode(key(2), kv(2)))
        for n in (0, 1):
            assert store.get(key(n)) is None
            assert not client.exists(f"{prefix}:kv:raw0.{key(n).name}")
        assert client.zcard(f"{prefix}:lru") == 0 and int(client.get(f"{prefix}:bytes")) == 0
        report = store.report()["tiers"][-1]
        assert report["corrupt"] == 2 and report["up"] and store.stats.misses == 2
    finally:
        store.close()


def test_redis_killed_means_local_tiers_only_and_it_comes_back(fresh_redis, prefix) -> None:
    store = replica(fresh_redis.url, prefix, retry_s=1.0)
    try:
        store.put(key(0), kv(0), recompute_cost=16)
        store.shared.flush()
        fresh_redis.stop()
        assert_same(store.get(key(0)), kv(0))  # local
        started = time.monotonic()
        assert store.get(key(1)) is None  # a miss, not an error
        assert not store.contains(key(1))
        store.put(key(1), kv(1), recompute_cost=16)
        store.shared.flush()
        report = store.report()["tiers"][-1]
        assert not report["up"] and report["down_reason"]
        assert report["errors"] == 1  # the breaker is open: no further call went to the network
        for _ in range(20):
            assert store.get(key(2)) is None
        assert store.report()["tiers"][-1]["errors"] == 1
        assert time.monotonic() - started < 2.0
        fresh_redis.start()  # back, empty
        time.sleep(max(0.0, 1.05 - (time.monotonic() - started)))  # the backoff has passed: the next call probes
        assert store.get(key(4)) is None and store.report()["tiers"][-1]["up"]
        store.put(key(3), kv(3), recompute_cost=16)
        store.shared.flush()
        assert fresh_redis.client().exists(f"{prefix}:kv:raw0.{key(3).name}")
    finally:
        store.close()


def test_a_hung_redis_costs_one_timeout_then_the_breaker_is_open(fresh_redis, prefix) -> None:
    store = replica(fresh_redis.url, prefix)
    try:
        store.shared.write_now(key(0), kv(0))
        fresh_redis.pause()
        started = time.monotonic()
        assert store.get(key(0)) is None
        assert store.get(key(0)) is None
        assert time.monotonic() - started < 2.5  # one timeout (0.5 s, with one retry on a fresh connection)
        assert not store.report()["tiers"][-1]["up"]
    finally:
        fresh_redis.resume()
        store.close()


def test_the_breaker_backs_off_doubling_and_lets_one_probe_through() -> None:
    breaker = CircuitBreaker(first_s=0.05, max_s=0.2)
    assert breaker.allow() and breaker.up
    breaker.failure("refused")
    assert not breaker.up and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure("refused")
    assert breaker._backoff_s == 0.1
    breaker.failure("refused")
    breaker.failure("refused")
    assert breaker._backoff_s == 0.2  # capped
    breaker.success()
    assert breaker.up and breaker.allow() and breaker._backoff_s == 0.05


def test_concurrent_writers_keep_the_shared_budget_and_its_bookkeeping_exact(redis_server, prefix) -> None:
    """Two replicas writing at once (their writer threads): the scripts keep the byte total, the sizes and the
    entries in step, and within the budget."""
    budget = 5 * ENCODED
    first = replica(redis_server.url, prefix, budget=budget)
    second = replica(redis_server.url, prefix, budget=budget)
    client = redis_server.client()
    try:
        for n in range(20):
            first.put(key(n), kv(n), recompute_cost=16)
            second.put(key(n + 10), kv(n + 10), recompute_cost=16)  # 10 of them the first's too
        first.shared.flush()
        second.shared.flush()
        names = [name.decode() for name in client.zrange(f"{prefix}:lru", 0, -1)]
        sizes = {name.decode(): int(size) for name, size in client.hgetall(f"{prefix}:sizes").items()}
        assert len(names) == 5 and set(sizes) == set(names)
        assert int(client.get(f"{prefix}:bytes")) == sum(sizes.values()) <= budget
        assert sorted(k.decode() for k in client.keys(f"{prefix}:kv:*")) == sorted(f"{prefix}:kv:{n}" for n in names)
        writes = first.report()["tiers"][-1]["writes"] + second.report()["tiers"][-1]["writes"]
        evictions = first.report()["tiers"][-1]["evictions"] + second.report()["tiers"][-1]["evictions"]
        assert writes - evictions == 5 and writes >= 30  # 30 chunks, each written at least once
    finally:
        first.close()
        second.close()


def test_writes_past_the_queued_bytes_are_dropped_not_waited_for(fresh_redis, prefix) -> None:
    store = replica(fresh_redis.url, prefix, write_queue_bytes=2 * kv(0).nbytes)
    try:
        store.shared.write_now(key(9), kv(9))  # connected
        fresh_redis.pause()  # the writer thread now waits on its first write
        started = time.monotonic()
        for n in range(3):
            store.put(key(n), kv(n), recompute_cost=16)
        assert time.monotonic() - started < 0.2  # put never waits for Redis
        assert store.report()["tiers"][-1]["dropped_writes"] == 1
        assert all(store.get(key(n)) is not None for n in range(3))  # local tiers hold them all
    finally:
        fresh_redis.resume()
        store.close()
