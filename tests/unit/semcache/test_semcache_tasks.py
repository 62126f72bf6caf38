"""The cache's background tasks end when it closes (semcache/tasks.py), and a store call cancelled as its
Redis command completes is cancelled, not returned (semcache/answer_store.py; CPython gh-86296: on Python 3.11
asyncio.wait_for returned the result then, and a cache's sync loop ran on after close for 300 s in CI)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from blendgate.semcache import tasks
from blendgate.semcache.answer_store import ChangeFeed, MemoryAnswerStore, RedisAnswerStore
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.metrics import SemanticCacheMetrics
from blendgate.semcache.settings import SemanticCacheSettings
from blendgate.semcache.tasks import cancel_and_wait
from prometheus_client import CollectorRegistry

pytestmark = pytest.mark.timeout(60)


def test_a_store_call_cancelled_as_its_command_completes_is_cancelled(redis_server) -> None:
    """The command's reply and the cancellation land in the same turn of the event loop."""
    async def scenario() -> None:
        store = RedisAnswerStore(redis_server.url, "tasks-test", "ns", 1.0)
        try:
            reply = asyncio.get_running_loop().create_future()
            call = asyncio.create_task(store._call(reply))
            await asyncio.sleep(0)  # the call now waits for the reply
            reply.set_result("OK")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await store.ping()  # the store still answers afterwards
        finally:
            await store.close()

    asyncio.run(scenario())


def test_cancel_and_wait_cancels_again_a_task_that_absorbed_a_cancellation(monkeypatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_AFTER_S", 0.05)
    absorbed = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if absorbed:
                    raise
                absorbed.append(True)  # the first cancellation is lost, as wait_for lost it

    async def scenario() -> None:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait([task]), 5)
        assert task.cancelled() and absorbed == [True]

    asyncio.run(scenario())


class AbsorbingStore(MemoryAnswerStore):
    """An embedded store whose change feed, once armed (after the start-up build), loses the first
    cancellation that meets it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.polled = asyncio.Event()
        self.absorbed = 0

    async def changes(self, cursor: str | None) -> ChangeFeed:
        if not self.armed:
            return ChangeFeed(cursor)
        self.polled.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self.absorbed:
                raise
            self.absorbed += 1
        return ChangeFeed(cursor)


def test_a_cache_closes_while_its_sync_loop_absorbs_a_cancellation(monkeypatch) -> None:
    monkeypatch.setattr(tasks, "RECANCEL_AFTER_S", 0.05)

    async def scenario() -> None:
        store = AbsorbingStore()
        cache = SemanticCache(SemanticCacheSettings(), store, 4, lambda texts: np.ones((len(texts), 4), np.float32),
                              SemanticCacheMetrics(CollectorRegistry()))
        await cache.start()
        store.armed = True
        await asyncio.wait_for(store.polled.wait(), 10)  # the sync loop is inside a poll of the store
        await asyncio.wait_for(cache.close(), 10)
        assert store.absorbed == 1

    asyncio.run(scenario())
