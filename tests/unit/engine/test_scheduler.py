"""The local engine's scheduling policy (engine/scheduler.py), plain Python: no model, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from blendgate.engine.errors import QueueFullError
from blendgate.engine.scheduler import Scheduler


class Request:
    """A stand-in for the engine's GenerationHandle: the scheduler only compares requests by identity."""


def test_scheduler_admits_in_order_rotates_and_bounds_the_queue() -> None:
    a, b, c, d = (Request() for _ in range(4))
    scheduler = Scheduler(max_running=2, max_waiting=1)
    scheduler.add(a)
    scheduler.add(b)
    assert [scheduler.next() for _ in range(3)] == [a, b, a]
    scheduler.add(c)
    with pytest.raises(QueueFullError):
        scheduler.add(d)
    scheduler.drop(a)
    assert [scheduler.next() for _ in range(2)] == [b, c]


def test_a_request_waits_for_a_free_slot_and_dropping_frees_it() -> None:
    a, b, c = (Request() for _ in range(3))
    scheduler = Scheduler(max_running=1, max_waiting=2)
    for request in (a, b, c):
        scheduler.add(request)
    assert [scheduler.next() for _ in range(2)] == [a, a]  # b and c wait, in order
    scheduler.drop(a)
    assert scheduler.next() is b and list(scheduler.waiting) == [c]
    scheduler.drop(c)  # a waiting request can go too (cancelled before it ran)
    scheduler.drop(b)
    assert not scheduler.has_work()


def test_the_scheduler_imports_no_torch() -> None:
    code = "import sys, blendgate.engine.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
