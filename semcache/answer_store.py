"""The answer store, where the semantic cache's entries (question, answer, embedding) live: Redis (shared by
replicas, with TTLs) or an embedded in-process store (one process, also what policy tests run on).

Both speak the same small async interface, `AnswerStore`. Changes are also appended to a Redis stream, which every
replica polls (`changes`) to keep its in-memory index in step with the others.
"""

from __future__ import annotations

import abc
import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Mapping

try:
    from asyncio import timeout as _deadline  # Python 3.11 and later
except ImportError:  # Python 3.10: async-timeout, the same context manager
    from async_timeout import timeout as _deadline

Fields = Mapping[Any, Any]

# A pooled connection idle this long is PINGed before it carries a command (one that died silently, with no
# FIN from the server, would otherwise time out a request).
HEALTH_CHECK_INTERVAL_S = 30


class StoreUnavailable(Exception):
    """The store did not answer in time or at all; the request goes on without the cache."""


@dataclass(frozen=True)
class Change:
    """One write or delete on the change stream. `position` is its stream id: the cursor once it is applied."""

    position: str
    op: Literal["put", "del"]
    entry_id: str


@dataclass(frozen=True)
class ChangeFeed:
    """What `AnswerStore.changes` read past a cursor.

    `cursor`: where the next read starts (the last change's position, or where a first read starts).
    `changes`: oldest first. `lost`: changes past the cursor are gone (trimmed from the capped stream, or lost
    with the store's data in a restart): the reader must rebuild its index from a scan."""

    cursor: str | None
    changes: list[Change] = field(default_factory=list)
    lost: bool = False


class AnswerStore(abc.ABC):
    """Entries by id as flat mappings (CacheEntry.to_fields); every call may raise StoreUnavailable."""

    kind: str  # "redis" or "memory": shown in /healthz and the admin API

    @abc.abstractmethod
    async def ping(self) -> None: ...

    @abc.abstractmethod
    async def put(self, entry_id: str, fields: dict[str, Any], ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def get(self, entry_id: str) -> Fields | None: ...

    @abc.abstractmethod
    async def record_hit(self, entry_id: str, now: float) -> None: ...

    @abc.abstractmethod
    async def delete(self, entry_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def scan(self) -> AsyncIterator[tuple[str, Fields]]:
        """Every live entry, for rebuilding the index."""

    async def changes(self, cursor: str | None) -> ChangeFeed:
        """Changes after `cursor` (None: no changes, and the cursor a first read starts from). Raises
        StoreUnavailable."""
        return ChangeFeed(cursor)

    async def purge_other_namespaces(self) -> int:
        """Delete entries written under another embedder; returns how many keys went."""
        return 0

    async def close(self) -> None:
        return None


class MemoryAnswerStore(AnswerStore):
    """The embedded store: one process, entries gone when it stops; no change stream (there are no other
    replicas). Used when no Redis is configured, and by tests of the cache's policy."""

    kind = "memory"

    def __init__(self) -> None:
        self._entries: dict[str, tuple[dict[str, Any], float]] = {}

    async def ping(self) -> None:
        return None

    async def put(self, entry_id: str, fields: dict[str, Any], ttl_s: float) -> None:
        self._entries[entry_id] = (dict(fields), time.time() + ttl_s)

    async def get(self, entry_id: str) -> Fields | None:
        found = self._entries.get(entry_id)
        if found is None:
            return None
        if found[1] <= time.time():
            del self._entries[entry_id]
            return None
        return found[0]

    async def record_hit(self, entry_id: str, now: float) -> None:
        found = self._entries.get(entry_id)
        if found is not None:
            found[0]["hits"] = str(int(found[0]["hits"]) + 1)
            found[0]["last_hit_at"] = repr(now)

    async def delete(self, entry_ids: list[str]) -> None:
        for entry_id in entry_ids:
            self._entries.pop(entry_id, None)

    async def scan(self) -> AsyncIterator[tuple[str, Fields]]:
        now = time.time()
        for entry_id, (fields, expires_at) in list(self._entries.items()):
            if expires_at > now:
                yield entry_id, fields


class RedisAnswerStore(AnswerStore):
    """Entries as Redis hashes with EXPIRE; a capped stream of changes for the other replicas."""

    kind = "redis"
    STREAM_LENGTH = 100_000
    DELETE_BATCH = 500

    def __init__(self, url: str, prefix: str, namespace: str, timeout_s: float) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors = (redis.RedisError, OSError, asyncio.TimeoutError)
        self._response_error = redis.ResponseError
        self.prefix = prefix
        self.namespace = f"{prefix}:{namespace}"
        self.timeout_s = timeout_s
        # A command that meets a dead connection (one the server closed, e.g. in a restart, while it sat in the
        # pool) is sent once more on a fresh connection; a timeout is not retried (a slow Redis is not asked
        # twice), and `_call` bounds the whole call either way.
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,)),
            health_check_interval=HEALTH_CHECK_INTERVAL_S)
        self.url = url

    def _key(self, entry_id: str) -> str:
        return f"{self.namespace}:entry:{entry_id}"

    @property
    def _stream(self) -> str:
        return f"{self.namespace}:changes"

    async def _call(self, operation, timeout_s: float | None = None):
        # Bound the whole call, reconnects included: a slow Redis must not hold a request up. A deadline around
        # the await, not asyncio.wait_for: on Python 3.11 wait_for returns the result when a cancellation meets
        # the operation's completion (CPython gh-86296), and a background loop cancelled that way never ends.
        try:
            async with _deadline(timeout_s or self.timeout_s * 2):
                return await operation
        except self._errors as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def put(self, entry_id: str, fields: dict[str, Any], ttl_s: float) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self._key(entry_id), mapping=fields)
        pipe.pexpire(self._key(entry_id), max(1, int(ttl_s * 1000)))
        pipe.xadd(self._stream, {"op": "put", "id": entry_id}, maxlen=self.STREAM_LENGTH, approximate=True)
        await self._call(pipe.execute())

    async def get(self, entry_id: str) -> Fields | None:
        async def read() -> Fields:
            try:
                return await self.client.hgetall(self._key(entry_id))
            except self._response_error as exc:  # not a hash: a corrupt entry, not a Redis outage
                return {b"unreadable": str(exc).encode()}

        fields = await self._call(read())
        return fields or None

    async def record_hit(self, entry_id: str, now: float) -> None:
        key = self._key(entry_id)
        # Only touch a hash that still exists: HSET on an expired key would resurrect it without a TTL.
        await self._call(self.client.eval(
            "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'hits', 1);"
            " redis.call('HSET', KEYS[1], 'last_hit_at', ARGV[1]) end return 0", 1, key, repr(now)))

    async def delete(self, entry_ids: list[str]) -> None:
        # In batches, each within the call timeout: invalidating a large category must not look like an outage.
        for start in range(0, len(entry_ids), self.DELETE_BATCH):
            batch = entry_ids[start:start + self.DELETE_BATCH]
            pipe = self.client.pipeline(transaction=True)
            pipe.unlink(*(self._key(e) for e in batch))
            for entry_id in batch:
                pipe.xadd(self._stream, {"op": "del", "id": entry_id}, maxlen=self.STREAM_LENGTH, approximate=True)
            await self._call(pipe.execute())

    async def scan(self) -> AsyncIterator[tuple[str, Fields]]:
        marker = f"{self.namespace}:entry:"
        cursor = 0
        while True:
            cursor, keys = await self._call(self.client.scan(cursor, match=f"{_glob_escape(marker)}*", count=1000))
            if keys:
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.hgetall(key)
                values = await self._call(pipe.execute(raise_on_error=False), timeout_s=max(5.0, self.timeout_s * 10))
                for key, fields in zip(keys, values):
                    if isinstance(fields, Exception):
                        # Not a hash (WRONGTYPE): yielded as an entry that fails to parse, so the cache drops
                        # it as corrupt; raising would fail every rebuild and keep the cache off for good.
                        fields = {b"unreadable": str(fields).encode()}
                    if fields:
                        yield key.decode()[len(marker):], fields
            if cursor == 0:
                return

    async def changes(self, cursor: str | None) -> ChangeFeed:
        if cursor is None:
            # Start from the newest change: the scan that precedes the first poll covers what came before.
            return ChangeFeed(await self._newest())
        oldest = await self._call(self.client.xrange(self._stream, count=1))
        if cursor != "0-0" and (not oldest or _stream_id(oldest[0][0].decode()) > _stream_id(cursor)):
            # Changes past our cursor were trimmed away, or the stream is gone with the rest of Redis's data (a
            # restart without persistence, a flush): some are lost, so rebuild from a scan.
            return ChangeFeed(await self._newest(), lost=True)
        read = await self._call(self.client.xread({self._stream: cursor}, count=10_000))
        changes = [Change(message_id.decode(), data[b"op"].decode(), data[b"id"].decode())
                   for _, messages in read or [] for message_id, data in messages]
        return ChangeFeed(changes[-1].position if changes else cursor, changes)

    async def _newest(self) -> str:
        last = await self._call(self.client.xrevrange(self._stream, count=1))
        return last[0][0].decode() if last else "0-0"

    async def purge_other_namespaces(self) -> int:
        removed, cursor = 0, 0
        while True:
            pattern = f"{_glob_escape(self.prefix)}:*"
            cursor, keys = await self._call(self.client.scan(cursor, match=pattern, count=1000),
                                            timeout_s=max(5.0, self.timeout_s * 10))
            stale = [k for k in keys if not k.decode().startswith(self.namespace + ":")]
            if stale:
                removed += await self._call(self.client.unlink(*stale))
            if cursor == 0:
                return removed

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except self._errors:
            pass


def _stream_id(value: str) -> tuple[int, int]:
    millis, _, sequence = value.partition("-")
    return int(millis), int(sequence or 0)


def _glob_escape(text: str) -> str:
    """A key prefix as a literal in a SCAN pattern, so `*`, `?` or `[` in it never match other keys."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
