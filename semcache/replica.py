"""Keeping one replica's index in step with the answer store: the start-up build, replica sync, sweeping and
recovery.

The index is rebuilt from the store at start-up and kept in step with other replicas by polling the store's
change stream. When the store fails or times out (CacheState.mark_down), the cache steps aside and a
background task brings it back once the store answers again: it sends the deletes that failed meanwhile
and catches up from the change stream where it left off, rebuilding the whole index only when that is
impossible (the index was never built, or changes past its cursor were trimmed or lost with the store's
data). Expired entries leave the index on a timer (the store expires its own copies).
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from .answer_store import Change, StoreUnavailable
from .entries import CacheEntry, CorruptEntry
from .index import PartitionedIndex
from .policy import CachePolicy
from .state import CacheState, indexed
from .tasks import cancel_and_wait

log = logging.getLogger("blendgate.semcache")

SYNC_INTERVAL_S = 0.5  # how often a replica polls the change stream
SWEEP_INTERVAL_S = 5.0  # how often expired entries leave the in-memory index


class ReplicaSync:
    """Builds the replica's index and keeps it in step: `start` (build, then the sync, sweep and recovery
    loops), `close`. `retry_s`: how long recovery waits between tries of a store that does not answer."""

    def __init__(self, state: CacheState, policy: CachePolicy, retry_s: float) -> None:
        self.state = state
        self.policy = policy
        self.retry_s = retry_s
        self._cursor: str | None = None  # the change-stream position the index reflects; None: never built
        self._rebuilding = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Drop entries of another embedder and build the index from the store; a store that does not answer
        leaves the cache bypassed (recovery builds it later). Then starts the background loops."""
        try:
            purged = await self.state.store.purge_other_namespaces()
            if purged:
                log.warning("semantic cache: dropped %d entries made with another embedder", purged)
            await self.rebuild("start")
        except StoreUnavailable as exc:
            self.state.mark_down("start", exc)
        self._tasks = [asyncio.create_task(self._sync_loop(), name="semcache sync"),
                       asyncio.create_task(self._sweep_loop(), name="semcache sweep"),
                       asyncio.create_task(self._recovery_loop(), name="semcache recover")]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)

    # -- building -------------------------------------------------------------------------------------------
    async def rebuild(self, reason: str) -> None:
        """Index every live entry of the store; `reason` (start, recovery, lost_changes) labels the count of
        rebuilds. Raises StoreUnavailable."""
        state = self.state
        started = time.perf_counter()
        state.metrics.rebuilds.labels(reason).inc()
        self._rebuilding = True  # sync waits: the changes it would apply to the old index are replayed after
        try:
            # Changes after this point are replayed by sync. The cursor moves with the new index only: a rebuild
            # that fails midway leaves the old index and its cursor, so recovery still knows what it missed.
            cursor = (await state.store.changes(None)).cursor
            corrupt: list[str] = []
            now = time.time()
            batches: dict[tuple[str, str], list[CacheEntry]] = {}
            async for entry_id, fields in state.store.scan():
                try:
                    entry = CacheEntry.from_fields(fields, state.dimension)
                except CorruptEntry as exc:
                    log.warning("semantic cache: dropping corrupt entry %s (%s)", entry_id, exc)
                    corrupt.append(entry_id)
                    continue
                if not entry.expired(now) and entry.category in self.policy:
                    batches.setdefault((entry.tenant, entry.category), []).append(entry)
            # Built off the event loop (a million entries take minutes) and swapped in whole, so lookups
            # keep using the old index meanwhile and never see one half built.
            state.index = await asyncio.to_thread(self._build_index, batches)
            self._cursor = cursor
        finally:
            self._rebuilding = False
        state.recount()
        if corrupt:
            await state.store.delete(corrupt)
            state.metrics.evictions.labels("unknown", "corrupt").inc(len(corrupt))
        state.mark_up()
        log.info("semantic cache: %d entries indexed from the %s store in %.2f s", len(state.index),
                 state.store.kind, time.perf_counter() - started)

    def _build_index(self, batches: dict[tuple[str, str], list[CacheEntry]]) -> PartitionedIndex:
        index = PartitionedIndex(self.state.dimension, self.state.hnsw)
        for (tenant, category), entries in batches.items():
            index.add_many(tenant, category, [indexed(e) for e in entries], np.stack([e.embedding for e in entries]))
        return index

    # -- recovery -------------------------------------------------------------------------------------------
    async def _recovery_loop(self) -> None:
        while True:
            await self.state.store_down.wait()
            await self._recover()

    async def _recover(self) -> None:
        """Try the store at once (a timeout is often over by then), then every `retry_s`, until it answers;
        then catch up and resume."""
        state = self.state
        while True:
            try:
                await state.store.ping()
                if state.undeleted:
                    await state.store.delete(sorted(state.undeleted))
                    state.undeleted.clear()
                if self._cursor is None:  # the index was never built (the store was down at start-up)
                    await self.rebuild("recovery")
                else:  # changes made meanwhile, from where sync left off (a rebuild when they are lost)
                    await self._sync_once()
            except StoreUnavailable as exc:
                state.down_reason = str(exc)
                await asyncio.sleep(self.retry_s)
                continue
            state.mark_up()
            log.info("semantic cache: %s store is back; cache resumed", state.store.kind)
            return

    # -- replica sync ---------------------------------------------------------------------------------------
    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL_S)
            if not self.state.available or self._rebuilding:
                continue
            try:
                await self._sync_once()
            except StoreUnavailable as exc:
                self.state.mark_down("sync", exc)

    async def _sync_once(self) -> None:
        """Apply the changes past the cursor, moving it past each one applied: a call the store fails midway
        resumes at the first change not applied. Raises StoreUnavailable."""
        feed = await self.state.store.changes(self._cursor)
        if feed.lost:
            log.warning("semantic cache: changes from other replicas were lost (trimmed, or the store lost its "
                        "data); rebuilding the index")
            await self.rebuild("lost_changes")
            return
        for change in feed.changes:
            await self._apply(change)
            self._cursor = change.position
        self._cursor = feed.cursor

    async def _apply(self, change: Change) -> None:
        state = self.state
        if change.op == "del":
            state.unindex(change.entry_id)
        elif change.op == "put" and state.index.get(change.entry_id) is None:
            fields = await state.store.get(change.entry_id)
            if fields is None:
                return
            try:
                entry = CacheEntry.from_fields(fields, state.dimension)
            except CorruptEntry:
                return  # the lookup that finds it drops it
            if entry.category in self.policy and not entry.expired():
                state.index_entry(entry)

    # -- sweeping -------------------------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Take expired entries out of the index (the store expires its own copies); returns how many went."""
        now = now if now is not None else time.time()
        expired = [meta.entry_id for partition in list(self.state.index.partitions.values())
                   for meta in partition.expired(now)]
        for entry_id in expired:
            self.state.unindex(entry_id, "expired")
        return len(expired)
