"""The gateway's Prometheus series recorded per request: requests, TTFT and request time by whether the
semantic cache answered, completion tokens, chunk-cache lookups, recompute ratio and prefill tokens saved
(from the PrefillReport), retrieval time (from the RagReport) and false-hit reports."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from ...semcache.metrics import TenantLabel
from ..backends.base import RequestContext

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


class GatewayMetrics:
    """The gateway's own series, recorded per request (observe_chat, false_hit; `requests` by the
    middleware.RequestCounter). Times in seconds."""

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

        self.audits = Counter("blendgate_semantic_cache_audits", "Semantic-cache hits answered again by the model "
                              "and compared with the cached answer (semcache/audit.py), by verdict: agree; "
                              "disagree (counted as a false hit, the entry invalidated); failed", ["category",
                                                                                                  "verdict"],
                              registry=registry)

    def audit(self, category: str, verdict: str) -> None:
        self.audits.labels(category, verdict).inc()

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
        report = ctx.chunk_cache
        if report is not None and report.hits is not None:
            self.chunk_lookups.labels(model, "hit").inc(report.hit_count)
            self.chunk_lookups.labels(model, "miss").inc(report.miss_count)
        if report is not None and report.blended and report.chunk_tokens > 0:
            self.recompute_ratio.labels(model).observe(report.recomputed_tokens / report.chunk_tokens)
            self.prefill_tokens_saved.labels(model).inc(report.chunk_tokens - report.recomputed_tokens)
        if ctx.rag is not None and ctx.rag.retrieval_ms is not None:
            self.retrieval.labels("chat").observe(ctx.rag.retrieval_ms / 1000)
