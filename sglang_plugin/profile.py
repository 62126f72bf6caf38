"""Where a pass of the plugin's spends its time (BLENDGATE_SGLANG_PROFILE=1): issue 20 asks where the time
between the local engine's blend and the same blend inside SGLang goes.

A PassProfile marks stages with CUDA events as the pass issues its work (no synchronisation until `finish`,
which waits once for the pass's last event), and a PassTimings holds the result: GPU milliseconds per stage, and
the host's wall time of the whole forward hook (planning included). The worker puts its `as_dict()` into each
blended request's report under PROFILE_KEY; bench/sglang_rows.py reads it back. Off by default: the
synchronisation at the end of the pass costs the overlap of SGLang's next scheduling step with the pass.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

PROFILE_KEY = "plugin_pass_ms"  # key of a report's PassTimings (milliseconds)
# Key of a profiled report's chunk-cache tiers after the pass: [{"name", "entries", "bytes", "budget_bytes"}] per
# local tier (ChunkCacheStore.report), what bench/load.py reports the tiers held.
TIERS_KEY = "chunk_cache_tiers"


@dataclass(frozen=True)
class PassTimings:
    """One plugin pass, in milliseconds: `plan` host time from the forward hook's entry to the pass's first
    launch (reading the batch, planning, the slower-than-full check); GPU time (CUDA events) of the requests'
    prefills (`prefill`: blends and exact prefills, chunk-cache misses computed included), of writing their KV
    into SGLang's pool (`kv_write`) and of SGLang's logits processor (`logits`); `gpu` from the first launch to
    the last event; `hook_wall` the host's wall time from the hook's entry to the end of the pass (after the
    final synchronisation). `misses`: the part of `prefill` spent computing chunks the chunk-cache lacked
    (ChunkBlender.chunk_kvs' passes). `pinned_alloc`: host time the pass spent pinning new host memory
    (PyTorch's caching host allocator growing: a CPU tier's new entries beyond its start-up reservation,
    chunkcache/tiers.py: MemoryTier.reserve), which stalls the launches of whatever stage it falls in.
    `requests`: the requests the pass prefilled (a request's share of the pass is the times over it)."""

    requests: int
    plan: float
    prefill: float
    kv_write: float
    logits: float
    gpu: float
    hook_wall: float
    misses: float = 0.0
    pinned_alloc: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {name: value if isinstance(value, int) else round(value, 3) for name, value in asdict(self).items()}


class PassProfile:
    """CUDA events around a pass's stages (`mark(stage)` after each stage's launches; a stage marked more than
    once, as `prefill` and `kv_write` per request, adds up). `entered`: time.perf_counter() at the hook's
    entry. CUDA only."""

    def __init__(self, entered: float) -> None:
        self.entered = entered
        self.plan_ms = (time.perf_counter() - entered) * 1000
        self._last = self._event()
        self._first = self._last
        self._spans: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._pinning_us = host_alloc_us()

    @staticmethod
    def _event() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, stage: str) -> None:
        """The work launched since the last mark belongs to `stage`."""
        event = self._event()
        self._spans.append((stage, self._last, event))
        self._last = event

    def finish(self, requests: int) -> PassTimings:
        """Waits for the pass's last event (one host synchronisation) and sums each stage's spans; `requests`:
        how many the pass prefilled."""
        self._last.synchronize()
        totals = {"prefill": 0.0, "kv_write": 0.0, "logits": 0.0, "misses": 0.0}
        for stage, start, end in self._spans:
            totals[stage] = totals.get(stage, 0.0) + start.elapsed_time(end)
        return PassTimings(requests=requests, plan=self.plan_ms, prefill=totals["prefill"] + totals["misses"],
                           kv_write=totals["kv_write"], logits=totals["logits"],
                           gpu=self._first.elapsed_time(self._last),
                           hook_wall=(time.perf_counter() - self.entered) * 1000, misses=totals["misses"],
                           pinned_alloc=(host_alloc_us() - self._pinning_us) / 1000)


def host_alloc_us() -> float:
    """Microseconds the process has spent in CUDA's pinned-memory allocations so far (the caching host
    allocator's `host_alloc_time` total, torch.cuda.host_memory_stats; 0 where this torch lacks it)."""
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})()
    total = stats.get("host_alloc_time.total")
    if total is None and isinstance(stats.get("host_alloc_time"), dict):
        total = stats["host_alloc_time"].get("total")
    return float(total or 0.0)
