"""The admin API's figures (docs/admin-api.md), built from the registry's samples: the same samples /metrics
prints, so the two never disagree."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry

from .series import GatewayMetrics


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
    """Per category: lookups, hits, hit rate, false-hit reports, entries and hit audits by verdict (agree,
    disagree, failed: semcache/audit.py), from the registry."""
    s = Samples(metrics.registry)
    lookups = s.by("blendgate_semantic_cache_lookups_total", "category")
    hits = s.by("blendgate_semantic_cache_lookups_total", "category", result="hit")
    false_hits = s.by("blendgate_semantic_cache_false_hit_reports_total", "category")
    entries = s.by("blendgate_semantic_cache_entries", "category")
    audits = {verdict: s.by("blendgate_semantic_cache_audits_total", "category", verdict=verdict)
              for verdict in ("agree", "disagree", "failed")}
    categories = sorted(set(lookups) | set(entries) | set(false_hits))
    return {c: {"lookups": int(lookups.get(c, 0)), "hits": int(hits.get(c, 0)),
                "hit_rate": _rate(hits.get(c, 0), lookups.get(c, 0)), "false_hits": int(false_hits.get(c, 0)),
                "entries": int(entries.get(c, 0)),
                "audits": {verdict: int(counts.get(c, 0)) for verdict, counts in audits.items()}}
            for c in categories if c}


def document_chunk_lookups(metrics: GatewayMetrics) -> dict[str, dict[str, Any]]:
    """Per model, the chunks of RAG prompts found in the chunk-cache: the figure the overview's chunk hit rate
    sums over models (the store's own tier counters also count the system prompt's KV)."""
    s = Samples(metrics.registry)
    lookups = s.by("blendgate_chunk_cache_lookups_total", "model")
    hits = s.by("blendgate_chunk_cache_lookups_total", "model", result="hit")
    return {model: {"lookups": int(n), "hits": int(hits.get(model, 0)),
                    "hit_rate": hits.get(model, 0) / n if n else None} for model, n in lookups.items()}
