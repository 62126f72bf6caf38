"""One object per key, made on first use: the per-model and per-device singletons of the GPU paths.

Some state belongs to a model or a device rather than to a request: a model's captured probe graphs and arena
(chunkcache/probe.py), its FP8 copy of the weights (chunkcache/probe_weights.py), a device's pinned upload
buffers (engine/staging.py). `InstancePerKey` keeps one per key, made by a factory under a lock (two threads
never build two), and, keyed weakly, lets it go with its model.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class InstancePerKey(Generic[K, V]):
    """`get(key)`: the key's instance, `factory(key)` the first time. `weak`: keys held weakly (a model's
    instance dropped with the model); otherwise kept for the process (devices). Thread-safe."""

    def __init__(self, factory: Callable[[K], V], weak: bool = True) -> None:
        self.factory = factory
        self.found: weakref.WeakKeyDictionary[K, V] | dict[K, V] = weakref.WeakKeyDictionary() if weak else {}
        self.lock = threading.Lock()

    def get(self, key: K) -> V:
        with self.lock:
            found = self.found.get(key)
            if found is None:
                found = self.found[key] = self.factory(key)
            return found
