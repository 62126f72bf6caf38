"""Ending the cache's background tasks (replica sync, sweeping, recovery, hit counts).

`task.cancel()` asks; it does not guarantee. A task can absorb the CancelledError, as Python 3.11's
`asyncio.wait_for` does when the cancellation meets the awaited operation's completion (CPython gh-86296), and a
`while True` loop that absorbed one runs on, so a close that awaits it never returns (seen in the test suite,
2026-12-03: a cache's close waited 300 s on its sync loop). `cancel_and_wait` asks again until each task ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

# How long a cancelled task has to end before it is cancelled again.
RECANCEL_AFTER_S = 0.2


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel every task of `tasks` and return once all have ended, cancelling again those still running after
    RECANCEL_AFTER_S. Their results and exceptions are collected and dropped (a task's own errors are its
    loop's to log)."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER_S)
    await asyncio.gather(*tasks, return_exceptions=True)
