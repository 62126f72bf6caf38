"""The shared chunk-cache tier: encoded chunk KV in one Redis server, read and written by every gateway replica
and SGLang worker.

Where it sits: beside the local tiers (tiers.py), looked up on a local miss by the store (kv_store.py), which
promotes a hit into its own top tier as it does a lower tier's hit, and written through on every `put`. Its
entries are not in any replica's bookkeeping (`Tier.entries` knows only what this process wrote), so it is not
a `Tier`: it answers `contains`, `read` and `write` over the network.

Layout under `key_prefix` (default "blendgate:chunk-kv"):
- `<prefix>:kv:<codec><level>.<ChunkKey.name>`: the entry, encoded by the framing `Codec` (codec/frame.py:
  checksum, key and token digest inside), so an entry of another model, prefix or chunk, or a damaged one, is
  refused: a miss, deleted. Replicas set to different codecs keep separate entries (one budget for all);
- `<prefix>:lru`: a sorted set of entry names by last use (seconds since the epoch, the client's clock);
- `<prefix>:sizes`: a hash of entry name -> encoded bytes; `<prefix>:bytes`: their sum.
Writes and removals are Lua scripts, so the byte budget is kept by all replicas together, atomically: a write
that takes the total past `budget_bytes` evicts the least recently used entries, whoever wrote them. A budget
of our own instead of Redis's `maxmemory`: the server may be the semantic cache's (whose entries must not be
evicted to make room for KV), and maxmemory-policy is one setting per server. The scripts touch entry keys they
build themselves, so the tier needs a standalone Redis (or one hash slot), not a cluster.

Redis down (refused, reset, timed out): every call is bounded by `timeout_s`, a failure opens the circuit
breaker, and while it is open the tier answers "miss" without trying the network; it is tried again after a
backoff that doubles (`retry_s`, 1 s by default, to 30 s) while the server stays down, one call at a time.
Requests never fail because of this tier: they find their chunks in the local tiers or recompute them.

Writes are queued to one background thread (encode, then SET): the engine's worker thread, which prefills,
never waits for them; a write that would take the queued bytes past `write_queue_bytes` is dropped (counted).
Reads are synchronous on the caller's thread, which is the engine's worker thread, never the asyncio event loop.

Each read that finds an entry is timed (bytes received over the seconds of its round trip, latency included)
into `link`, the link's rate estimate that bandwidth adaptation (adaptation.py) decides with; `entry_sizes`
gives the encoded size of the entries it would fetch, in one round trip.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass

import torch

from ..kernels.graph_capture import gpu_work
from . import defaults
from .adaptation import DEFAULT_LINK_BYTES_PER_S, RateEstimate
from .codec import Codec
from .keys import ChunkKey
from .kv import ChunkKV

log = logging.getLogger("blendgate.chunkcache")

# KEYS: entry, lru, sizes, bytes. ARGV: payload, now, budget, entry name, entry key prefix.
# Returns {written (1, 0 already held, -1 larger than the budget), evicted, bytes used, entries}.
_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
  return {0, 0, tonumber(redis.call('GET', KEYS[4]) or '0'), redis.call('ZCARD', KEYS[2])}
end
local size = string.len(ARGV[1])
local budget = tonumber(ARGV[3])
if size > budget then
  return {-1, 0, tonumber(redis.call('GET', KEYS[4]) or '0'), redis.call('ZCARD', KEYS[2])}
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[4], size)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
local used = redis.call('INCRBY', KEYS[4], size)
local evicted = 0
while used > budget do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  local name = oldest[1]
  local freed = tonumber(redis.call('HGET', KEYS[3], name) or '0')
  redis.call('HDEL', KEYS[3], name)
  redis.call('DEL', ARGV[5] .. name)
  used = redis.call('DECRBY', KEYS[4], freed)
  evicted = evicted + 1
end
return {1, evicted, used, redis.call('ZCARD', KEYS[2])}
"""

# KEYS: entry, lru, sizes, bytes. ARGV: entry name. Deletes the entry and its bookkeeping.
_REMOVE = """
local freed = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
if freed > 0 then redis.call('DECRBY', KEYS[4], freed) end
return 0
"""


class CircuitBreaker:
    """Open after a failure; half-open (one call let through) once the backoff has passed, which doubles from
    `first_s` to `max_s` while calls keep failing. Thread-safe."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.down_reason: str | None = None  # None: closed (the server answers)
        self._backoff_s = first_s
        self._retry_at = 0.0
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.down_reason is None

    def allow(self) -> bool:
        """Whether a call may go to the server now. While open, the first caller past the retry time is the
        probe; the others keep being refused until it has answered."""
        with self._lock:
            if self.down_reason is None:
                return True
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._backoff_s  # the next probe, should this one fail
            return True

    def success(self) -> None:
        with self._lock:
            if self.down_reason is not None:
                log.info("shared chunk-cache tier: Redis answers again")
            self.down_reason = None
            self._backoff_s = self.first_s

    def failure(self, reason: str) -> None:
        with self._lock:
            if self.down_reason is None:
                log.warning("shared chunk-cache tier: Redis is down (%s); local tiers only, retrying in %.1f s",
                            reason, self._backoff_s)
            else:
                self._backoff_s = min(self._backoff_s * 2, self.max_s)
            self.down_reason = reason
            self._retry_at = time.monotonic() + self._backoff_s


@dataclass
class RedisTierReport:
    """The shared tier's figures, between the tier and the store's report (kv_store.py), hence the admin API's
    chunk-cache view and /metrics. `entries` and `bytes` are the whole shared tier's (all replicas), as last
    seen by a read or write of this process (no Redis call is made for a report); the counters are this
    process's."""

    name: str
    budget_bytes: int
    up: bool = True
    down_reason: str | None = None  # the last failure, while down
    entries: int = 0
    bytes: int = 0  # encoded bytes
    hits: int = 0  # reads that found a valid entry
    misses: int = 0  # reads that found none (or the tier was down)
    writes: int = 0  # entries this process stored (already held ones not counted)
    evictions: int = 0  # entries this process's writes pushed out
    corrupt: int = 0  # damaged or mismatched entries found, and deleted
    dropped_writes: int = 0  # writes not made: the queue was full or the server down
    errors: int = 0  # calls that failed (refused, reset, timed out)

    def as_dict(self) -> dict:
        return asdict(self)


class RedisTier:
    """Chunk KV shared through one Redis server (see the module's docstring). `timeout_s` bounds each call
    (connect, send, receive); `write_queue_bytes` bounds the KV bytes waiting for the writer thread (queued
    entries keep their tensors, on the GPU too, alive); `retry_s` is the circuit breaker's first backoff (doubling
    to 30 s). `link`: the estimate its reads are measured into (default: a new one, from adaptation.py's prior).
    `device`: the blend's; entries are decoded where `codec.decode_device(device)` says (kernels/rans.py on
    that GPU for the cachegen codec, else the host).

    Thread-safe: the engine's worker thread reads, the writer thread writes, the gateway reads `report()`."""

    def __init__(self, url: str, budget_bytes: int = defaults.REDIS_BUDGET_BYTES,
                 key_prefix: str = defaults.REDIS_KEY_PREFIX, timeout_s: float = defaults.REDIS_TIMEOUT_S,
                 codec: Codec | None = None, write_queue_bytes: int = defaults.REDIS_WRITE_QUEUE_BYTES,
                 retry_s: float = defaults.REDIS_RETRY_S, name: str = "redis", link: RateEstimate | None = None,
                 device: str | torch.device = "cpu") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.name = name
        self.url = url
        self.budget_bytes = budget_bytes
        self.key_prefix = key_prefix
        self.codec = codec or Codec()
        self.decode_device = self.codec.decode_device(device)
        self._pin = torch.cuda.is_available() and self.decode_device.type == "cpu"
        self.breaker = CircuitBreaker(first_s=retry_s, max_s=max(30.0, retry_s))
        self._errors = (redis.RedisError, OSError)
        # A command meeting a connection the server closed while it sat in the pool is sent once more on a fresh
        # one; a timeout is not retried (a slow Redis is not asked twice).
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,)))
        self._write_script = self.client.register_script(_WRITE)
        self._remove_script = self.client.register_script(_REMOVE)
        self.link = link or RateEstimate(DEFAULT_LINK_BYTES_PER_S)  # measured by `read`
        self._stats = RedisTierReport(name, budget_bytes)
        self._stats_lock = threading.Lock()
        self.write_queue_bytes = write_queue_bytes
        self._queued_bytes = 0  # KV bytes in the queue, under _stats_lock
        self._queue: queue.Queue[tuple[ChunkKey, ChunkKV] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="chunk-cache redis writer", daemon=True)
        self._writer.start()

    # -- keys -----------------------------------------------------------------------------------------------
    def _member(self, key: ChunkKey) -> str:
        """The entry's name in the bookkeeping: its codec and level, then the chunk key. Replicas set to other
        codecs keep separate entries (each reads only its own), rather than refusing and deleting each other's."""
        return f"{self.codec.kv_codec.name}{self.codec.kv_codec.level}.{key.name}"

    def _entry(self, key: ChunkKey) -> str:
        return f"{self.key_prefix}:kv:{self._member(key)}"

    @property
    def _bookkeeping(self) -> list[str]:
        return [f"{self.key_prefix}:lru", f"{self.key_prefix}:sizes", f"{self.key_prefix}:bytes"]

    # -- calls ----------------------------------------------------------------------------------------------
    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for field, by in increments.items():
                setattr(self._stats, field, getattr(self._stats, field) + by)

    def _failed(self, exc: Exception) -> None:
        self._count(errors=1)
        self.breaker.failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    def contains(self, keys: list[ChunkKey]) -> list[bool]:
        """Whether Redis holds an entry under each key (one round trip; not checked for damage: `read` does
        that). All False when the tier is down."""
        return [size is not None for size in self.entry_sizes(keys)]

    def entry_sizes(self, keys: list[ChunkKey]) -> list[int | None]:
        """Each key's entry size in encoded bytes (from `<prefix>:sizes`), None where Redis holds no entry; one
        round trip (the entries' existence and their sizes together). All None when the tier is down."""
        if not keys or not self.breaker.allow():
            return [None] * len(keys)
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._entry(key))
            pipe.hmget(self._bookkeeping[1], [self._member(key) for key in keys])
            *found, sizes = pipe.execute()
        except self._errors as exc:
            self._failed(exc)
            return [None] * len(keys)
        self.breaker.success()
        return [int(size or 0) if held else None for held, size in zip(found, sizes)]

    def read(self, key: ChunkKey) -> ChunkKV | None:
        """The entry under `key`, decoded on `decode_device` (the host, tensors pinned when there is a GPU; or
        the blend's GPU for a codec that decodes faster there: Codec.decode_device), and marked used now; None
        when there is none, the tier is down, or the entry is damaged or another key's (then it is deleted)."""
        if not self.breaker.allow():
            self._count(misses=1)
            return None
        try:
            lru, _, used = self._bookkeeping
            pipe = self.client.pipeline(transaction=False)
            pipe.get(self._entry(key))
            pipe.zadd(lru, {self._member(key): time.time()}, xx=True)
            pipe.get(used)
            pipe.zcard(lru)
            started = time.perf_counter()
            data, _, used_bytes, entries = pipe.execute(raise_on_error=False)
            seconds = time.perf_counter() - started
        except self._errors as exc:
            self._failed(exc)
            self._count(misses=1)
            return None
        self.breaker.success()
        if isinstance(data, bytes):
            self.link.observe(len(data), seconds)
        self._seen(used_bytes, entries)
        if data is None:
            self._count(misses=1)
            return None
        # An error reply is not a string. On a GPU (the cachegen codec's) the bytes go up pinned, a kernel decodes.
        kv = self.codec.decode(key, data, self.decode_device) if isinstance(data, bytes) else None
        if kv is None:
            log.warning("shared chunk-cache tier: deleting damaged entry %s", key.name)
            self._count(corrupt=1, misses=1)
            self.remove(key)
            return None
        self._count(hits=1)
        if self._pin:  # as the CPU-memory tier's: blending streams it up behind compute, layer group by group
            kv = ChunkKV(kv.token_ids, kv.keys.pin_memory(), kv.values.pin_memory())
        return kv

    def write(self, key: ChunkKey, kv: ChunkKV) -> None:
        """Queue the entry for the writer thread (encoded and stored there, once for all replicas: an entry
        already held is only marked used). Dropped, and counted, when it would take the queued bytes past
        `write_queue_bytes` or the tier is down (reads probe the server meanwhile: `read` and `contains` close the
        breaker again)."""
        with self._stats_lock:
            if not self.breaker.up or self._queued_bytes + kv.nbytes > self.write_queue_bytes:
                self._stats.dropped_writes += 1
                return
            self._queued_bytes += kv.nbytes
        self._queue.put((key, kv))

    def write_now(self, key: ChunkKey, kv: ChunkKV) -> bool:
        """Encode and store the entry on this thread; whether Redis holds it afterwards. An entry on a GPU is
        encoded there, never during a CUDA graph capture (kernels/graph_capture.py)."""
        if kv.keys.is_cuda:
            with gpu_work():
                data = self.codec.encode(key, kv)
        else:
            data = self.codec.encode(key, kv)
        try:
            written, evicted, used, entries = self._write_script(
                keys=[self._entry(key), *self._bookkeeping],
                args=[data, time.time(), self.budget_bytes, self._member(key), f"{self.key_prefix}:kv:"])
        except self._errors as exc:
            self._failed(exc)
            return False
        self.breaker.success()
        self._count(writes=int(written == 1), evictions=int(evicted))
        self._seen(used, entries)
        return written >= 0

    def _seen(self, used_bytes, entries) -> None:
        """Record the whole tier's size as a call just read it (replies that are errors are skipped)."""
        if isinstance(entries, int):
            with self._stats_lock:
                self._stats.bytes, self._stats.entries = int(used_bytes or 0), entries

    def remove(self, key: ChunkKey) -> None:
        """Delete the entry and its bookkeeping (nothing happens when there is none, or the tier is down)."""
        if not self.breaker.allow():
            return
        try:
            self._remove_script(keys=[self._entry(key), *self._bookkeeping], args=[self._member(key)])
        except self._errors as exc:
            self._failed(exc)
            return
        self.breaker.success()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self.breaker.up:
                    self.write_now(*item)
                else:
                    self._count(dropped_writes=1)
            except Exception:  # noqa: BLE001 - an encoding bug must not kill the writer: logged, write dropped
                log.exception("shared chunk-cache tier: write failed")
                self._count(dropped_writes=1)
            finally:
                if item is not None:
                    with self._stats_lock:
                        self._queued_bytes -= item[1].nbytes
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued write has been made (or dropped)."""
        self._queue.join()

    def report(self) -> RedisTierReport:
        """This tier's figures now (no Redis call: see RedisTierReport)."""
        with self._stats_lock:
            report = RedisTierReport(**asdict(self._stats))
        report.up, report.down_reason = self.breaker.up, self.breaker.down_reason
        return report

    def close(self) -> None:
        """Stop the writer thread once the queued writes are made (bounded by the calls' timeouts), then close
        the connections."""
        self._queue.put(None)
        self._writer.join(timeout=30)
        self.client.close()
