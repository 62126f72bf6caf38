"""CUDA graph capture that the process's other threads cannot spoil.

While a stream captures, the CUDA runtime refuses calls that would wait for it: a capture in its default
("global") mode is invalidated by such a call from any thread, and a device-wide synchronise is refused whatever
the mode (CUDA programming guide, "Cross-stream dependencies and events" and cudaStreamCaptureMode). A gateway
captures graphs (the blend's probe, the batched decode step, SpeCache's step) on its engine thread while other
threads use the same GPU: the shared chunk-cache tier's writer encodes entries there and waits for them. Seen on
the H200 (2026-12-01): bench/fetch_ttft.py on SmolLM2 aborted in the probe's capture.

So captures run in "thread_local" mode (the other threads' calls no longer invalidate them) and under
`CAPTURE_LOCK`, which any other thread takes around GPU work that waits for the device (`gpu_work`): a capture
is short and rare (once per shape), so the wait is too.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch

# Held by a capture, and by another thread's GPU work that may wait for the device (gpu_work).
CAPTURE_LOCK = threading.RLock()


@contextmanager
def capture(graph: torch.cuda.CUDAGraph, pool) -> Iterator[None]:
    """torch.cuda.graph(graph, pool=pool), thread-locally and under CAPTURE_LOCK."""
    with CAPTURE_LOCK, torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        yield


@contextmanager
def gpu_work() -> Iterator[None]:
    """Around GPU work on a thread other than the one that captures (it waits while a capture is under way)."""
    with CAPTURE_LOCK:
        yield
