"""The gateway's Prometheus series (served at /metrics) and the snapshot the admin API and UI read from them.

One CollectorRegistry holds everything: the series recorded here per request, the semantic cache's own
(semcache/metrics.py), and collectors that read live state at scrape time (chunk-cache tiers, queue depth).
The admin API builds its figures from `snapshot(registry)`, the same samples /metrics prints, so the two
never disagree.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..semcache.metrics import TenantLabel
from .backends.base import RequestContext

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


def route_of(path: str) -> str:
    """A bounded route label for a request path (paths carry collection names and ids)."""
    for prefix, route in (("/v1/chat/completions", "chat"), ("/v1/retrieve", "retrieve"),
                          ("/v1/collections", "collections"), ("/v1/models", "models"),
                          ("/v1/semantic-cache", "semantic_cache"), ("/admin", "admin"), ("/metrics", "metrics"),
                          ("/healthz", "health")):
        if path.startswith(prefix):
            return route
    return "other"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, tenant_label: TenantLabel) -> None:
        self.registry = registry
        self.tenant_label = tenant_label
        self.started_at = time.time()
        self.requests = Counter("blendgate_requests", "HTTP requests by model (chat only), status and route",
                                ["model", "status", "route"], registry=registry)
        self.ttft = Histogram("blendgate_time_to_first_token_seconds", "Time to the first answer token, by "
                              "whether the semantic cache answered", ["model", "cache"], registry=registry,
                              buckets=_LATENCY_BUCKETS)
        self.latency = Histogram("blendgate_request_duration_seconds", "Whole chat request time, by whether "
                                 "the semantic cache answered", ["model", "cache"], registry=registry,
                                 buckets=_LATENCY_BUCKETS)
        self.completion_tokens = Counter("blendgate_completion_tokens", "Completion tokens sent, by whether "
                                         "the semantic cache answered (hit: tokens not generated)",
                                         ["model", "cache"], registry=registry)
        self.chunk_lookups = Counter("blendgate_chunk_cache_lookups", "Chunk-cache lookups of RAG prompts' "
                                     "chunks by result (hit, miss)", ["model", "result"], registry=registry)
        self.recompute_ratio = Histogram("blendgate_blend_recompute_ratio", "Share of chunk tokens recomputed "
                                         "by a blended prefill", ["model"], registry=registry,
                                         buckets=_RATIO_BUCKETS)
        self.prefill_tokens_saved = Counter("blendgate_blend_prefill_tokens_saved", "Chunk tokens whose KV came "
                                            "from the chunk-cache instead of being computed", ["model"],
                                            registry=registry)
        self.retrieval = Histogram("blendgate_retrieval_seconds", "Retrieval time (embedding the question and "
                                   "searching the collection)", ["route"], registry=registry,
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.false_hits = Counter("blendgate_semantic_cache_false_hit_reports", "Cached answers reported wrong "
                                  "by clients", ["category", *tenant_label.names], registry=registry)

    def false_hit(self, category: str, tenant: str) -> None:
        self.false_hits.labels(category, *self.tenant_label.values(tenant)).inc()

    def observe_chat(self, model: str, ctx: RequestContext) -> None:
        """A chat request that finished (answered from the cache or by a backend)."""
        hit = ctx.backend == "semantic_cache"
        cache = "hit" if hit else "miss"
        if ctx.first_token_at is not None:
            self.ttft.labels(model, cache).observe(ctx.first_token_at - ctx.arrived_at)
        if ctx.finished_at is not None:
            self.latency.labels(model, cache).observe(ctx.finished_at - ctx.arrived_at)
        if ctx.usage is not None:
            self.completion_tokens.labels(model, cache).inc(ctx.usage.completion_tokens)
        report = ctx.chunk_cache or {}
        hits = report.get("hits")  # a worker's raw report; the local backend names each chunk's hit instead
        if hits is None and isinstance(report.get("chunks"), list):
            hits = [bool(chunk.get("hit")) for chunk in report["chunks"]]
        if isinstance(hits, list):
            self.chunk_lookups.labels(model, "hit").inc(sum(bool(h) for h in hits))
            self.chunk_lookups.labels(model, "miss").inc(sum(not h for h in hits))
        if isinstance(report.get("chunk_tokens"), int) and isinstance(report.get("recomputed_tokens"), int) \
                and report["chunk_tokens"] > 0 and report.get("mode") in ("blend", "reuse"):
            self.recompute_ratio.labels(model).observe(report["recomputed_tokens"] / report["chunk_tokens"])
            self.prefill_tokens_saved.labels(model).inc(report["chunk_tokens"] - report["recomputed_tokens"])
        if ctx.rag and isinstance(ctx.rag.get("retrieval_ms"), (int, float)):
            self.retrieval.labels("chat").observe(ctx.rag["retrieval_ms"] / 1000)


class LiveStateCollector(Collector):
    """Series read from live state at scrape time: each local model's chunk-cache tiers (the store's own
    counters) and each model's queue depth."""

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
            misses.add_metric([model], report["misses"])
        queue = GaugeMetricFamily("blendgate_backend_queue_depth", "Chat requests a model is working on or "
                                  "waiting for (semantic-cache hits excluded)", labels=["model"])
        for model, depth in self.queue_depth().items():
            queue.add_metric([model], depth)
        return [hits, evictions, stored, budget, entries, misses, queue]


# -- the admin API's view of the same samples -------------------------------------------------------------
class Samples:
    """Every sample in the registry, summed over the labels a question leaves open."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in registry.collect():
            for sample in family.samples:
                self.by_name[sample.name].append((sample.labels, sample.value))

    def total(self, name: str, **match: str) -> float:
        return sum(value for labels, value in self.by_name.get(name, [])
                   if all(labels.get(k) == v for k, v in match.items()))

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        grouped: dict[str, float] = defaultdict(float)
        for labels, value in self.by_name.get(name, []):
            if all(labels.get(k) == v for k, v in match.items()):
                grouped[labels.get(label, "")] += value
        return dict(grouped)

    def mean(self, histogram: str, **match: str) -> dict[str, float | int | None]:
        count = self.total(f"{histogram}_count", **match)
        total = self.total(f"{histogram}_sum", **match)
        return {"count": int(count), "mean": total / count if count else None}


def _in_ms(mean: dict[str, Any]) -> dict[str, Any]:
    return {"count": mean["count"], "mean": None if mean["mean"] is None else round(mean["mean"] * 1000, 2)}


def _rate(hits: float, lookups: float) -> float | None:
    return hits / lookups if lookups else None


def snapshot(metrics: GatewayMetrics, entry_store: str | None = None) -> dict[str, Any]:
    """The admin overview (docs/admin-api.md, GET /admin/api/stats), from the registry's samples;
    `entry_store`: the semantic cache's store kind ("redis", "embedded") or None when it is off."""
    s = Samples(metrics.registry)
    semantic_lookups = s.total("blendgate_semantic_cache_lookups_total")
    semantic_hits = s.total("blendgate_semantic_cache_lookups_total", result="hit")
    chunk_lookups = s.total("blendgate_chunk_cache_lookups_total")
    chunk_hits = s.total("blendgate_chunk_cache_lookups_total", result="hit")
    ttft = {cache: _in_ms(s.mean("blendgate_time_to_first_token_seconds", cache=cache)) for cache in ("hit", "miss")}
    latency_hit = s.mean("blendgate_request_duration_seconds", cache="hit")
    latency_miss = s.mean("blendgate_request_duration_seconds", cache="miss")
    saved_s = 0.0
    if latency_hit["count"] and latency_miss["mean"] is not None:
        saved_s = latency_hit["count"] * max(0.0, latency_miss["mean"] - (latency_hit["mean"] or 0.0))
    retrieval = s.mean("blendgate_retrieval_seconds")
    ratio = s.mean("blendgate_blend_recompute_ratio")
    store_up = s.by_name.get("blendgate_semantic_cache_store_up")
    return {
        "time": time.time(),
        "uptime_s": round(time.time() - metrics.started_at, 1),
        "requests": {"total": int(s.total("blendgate_requests_total")),
                     "by_model": {k: int(v) for k, v in s.by("blendgate_requests_total", "model").items() if k},
                     "by_status": {k: int(v) for k, v in s.by("blendgate_requests_total", "status").items()},
                     "by_route": {k: int(v) for k, v in s.by("blendgate_requests_total", "route").items()}},
        "layers": {
            "semantic_cache": {"lookups": int(semantic_lookups), "hits": int(semantic_hits),
                               "hit_rate": _rate(semantic_hits, semantic_lookups)},
            "chunk_cache": {"lookups": int(chunk_lookups), "hits": int(chunk_hits),
                            "hit_rate": _rate(chunk_hits, chunk_lookups)},
            "retrieval": {"requests": retrieval["count"],
                          "mean_ms": None if retrieval["mean"] is None else round(retrieval["mean"] * 1000, 2)},
        },
        "ttft_ms": {"cache_hit": ttft["hit"], "miss": ttft["miss"]},
        "saved": {"tokens": int(s.total("blendgate_completion_tokens_total", cache="hit")),
                  "seconds": round(saved_s, 2)},
        "blend": {"prefill_tokens_saved": int(s.total("blendgate_blend_prefill_tokens_saved_total")),
                  "mean_recompute_ratio": ratio["mean"]},
        "backend": {"queue_depth": {k: int(v) for k, v in s.by("blendgate_backend_queue_depth", "model").items()}},
        "redis": {"up": bool(store_up and store_up[0][1])} if entry_store == "redis" else None,
    }


def semantic_categories(metrics: GatewayMetrics) -> dict[str, dict[str, Any]]:
    """Per category: lookups, hits, hit rate, false-hit reports and entries, from the registry."""
    s = Samples(metrics.registry)
    lookups = s.by("blendgate_semantic_cache_lookups_total", "category")
    hits = s.by("blendgate_semantic_cache_lookups_total", "category", result="hit")
    false_hits = s.by("blendgate_semantic_cache_false_hit_reports_total", "category")
    entries = s.by("blendgate_semantic_cache_entries", "category")
    categories = sorted(set(lookups) | set(entries) | set(false_hits))
    return {c: {"lookups": int(lookups.get(c, 0)), "hits": int(hits.get(c, 0)),
                "hit_rate": _rate(hits.get(c, 0), lookups.get(c, 0)), "false_hits": int(false_hits.get(c, 0)),
                "entries": int(entries.get(c, 0))} for c in categories if c}


class RequestCounter:
    """ASGI middleware: counts every HTTP request by model (set by the chat route in request.state), status
    and route once its response is over (a stream when it ends)."""

    def __init__(self, app, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            model = (scope.get("state") or {}).get("model", "")
            self.counter.labels(model, str(status), route_of(scope.get("path", ""))).inc()
