"""Series read from live state at scrape time (a prometheus_client Collector), not recorded per request."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class LiveStateCollector(Collector):
    """Series read from live state at scrape time: each local model's chunk-cache tiers (the store's own
    counters; for the shared Redis tier also whether it is up, and the damaged entries it deleted) and each
    model's queue depth."""

    def __init__(self, chunk_stores: Callable[[], dict[str, Any]], queue_depth: Callable[[], dict[str, int]]):
        self.chunk_stores = chunk_stores
        self.queue_depth = queue_depth

    def collect(self) -> Iterable:
        hits = CounterMetricFamily("blendgate_chunk_cache_tier_hits", "Chunk-cache hits by tier",
                                   labels=["model", "tier"])
        evictions = CounterMetricFamily("blendgate_chunk_cache_tier_evictions", "Chunk-cache evictions by tier",
                                        labels=["model", "tier"])
        stored = GaugeMetricFamily("blendgate_chunk_cache_tier_bytes", "Bytes of chunk KV held, by tier",
                                   labels=["model", "tier"])
        budget = GaugeMetricFamily("blendgate_chunk_cache_tier_budget_bytes", "Byte budget of each tier",
                                   labels=["model", "tier"])
        entries = GaugeMetricFamily("blendgate_chunk_cache_tier_entries", "Chunks held, by tier",
                                    labels=["model", "tier"])
        up = GaugeMetricFamily("blendgate_chunk_cache_tier_up", "1 while a shared tier's server answers, 0 while it "
                               "is down and only the local tiers serve", labels=["model", "tier"])
        corrupt = CounterMetricFamily("blendgate_chunk_cache_tier_corrupt", "Damaged or mismatched entries a "
                                      "shared tier found and deleted", labels=["model", "tier"])
        misses = CounterMetricFamily("blendgate_chunk_cache_misses", "Chunk KV computed because no tier had it",
                                     labels=["model"])
        for model, report in self.chunk_stores().items():
            for tier in report["tiers"]:
                labels = [model, tier["name"]]
                hits.add_metric(labels, tier["hits"])
                evictions.add_metric(labels, tier["evictions"])
                stored.add_metric(labels, tier["bytes"])
                budget.add_metric(labels, tier["budget_bytes"])
                entries.add_metric(labels, tier["entries"])
                if tier.get("shared"):  # the shared tier (kv_store.py: its report's last row)
                    up.add_metric(labels, 1 if tier["up"] else 0)
                    corrupt.add_metric(labels, tier["corrupt"])
            misses.add_metric([model], report["misses"])
        queue = GaugeMetricFamily("blendgate_backend_queue_depth", "Chat requests a model is working on or "
                                  "waiting for (semantic-cache hits excluded)", labels=["model"])
        for model, depth in self.queue_depth().items():
            queue.add_metric([model], depth)
        return [hits, evictions, stored, budget, entries, up, corrupt, misses, queue]
