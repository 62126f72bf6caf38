"""Prometheus series of the semantic cache, registered on the registry the gateway exposes at /metrics.

Counters, the entries and store-up gauges and the lookup histogram are updated as the cache works; the
load-adaptive policy in force (effective threshold and TTL per model and category, each model's load level)
is read at scrape time by `PolicyCollector`, the false-hit bound by `BoundCollector` and what false-hit
reports taught by `FeedbackCollector`, so nothing has to refresh them before a scrape.
"""

from __future__ import annotations

import hashlib
from typing import Iterator, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .feedback import FeedbackLearner
from .policy import CachePolicy
from .verifier import Verifier

TenantLabelMode = Literal["name", "hash", "drop"]


class TenantLabel:
    """How a tenant appears in the Prometheus series (/metrics is open, so this is the operator's choice):
    "name" as configured; "hash" the first 12 hex digits of the SHA-256 of the name (stable across restarts
    and replicas; `printf %s NAME | sha256sum | cut -c1-12` maps a name to it); "drop" not at all (the
    series have no tenant label and count all tenants together)."""

    def __init__(self, mode: TenantLabelMode = "name") -> None:
        self.mode = mode

    @property
    def names(self) -> list[str]:
        """The label names a per-tenant series has: ["tenant"], or none when dropped."""
        return [] if self.mode == "drop" else ["tenant"]

    def values(self, tenant: str) -> list[str]:
        """The label values for this tenant, matching `names`."""
        if self.mode == "drop":
            return []
        return [hashlib.sha256(tenant.encode()).hexdigest()[:12] if self.mode == "hash" else tenant]


class PolicyCollector(Collector):
    """The load-adaptive policy in force, read at scrape time: per model the load monitor knows (in the gateway,
    every backend's model: the chat service watches each one's queue), its load level (0 to 1) and each
    category's effective similarity threshold and TTL (seconds)."""

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        threshold, ttl, load_level = self._families()
        for model in self.policy.load.models():
            level = self.policy.load.level(model)
            load_level.add_metric([model], level)
            for category in self.policy.categories:
                in_force = self.policy.policy_for(model, category)
                threshold.add_metric([model, category], in_force.threshold)
                ttl.add_metric([model, category], in_force.ttl_s)
        return iter((threshold, ttl, load_level))

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("blendgate_semantic_cache_effective_threshold", "Similarity threshold in force",
                                  labels=["model", "category"]),
                GaugeMetricFamily("blendgate_semantic_cache_effective_ttl_seconds", "TTL given to new entries now",
                                  labels=["model", "category"]),
                GaugeMetricFamily("blendgate_model_load_level", "0 = below the load marks, 1 = full load",
                                  labels=["model"]))


class BoundCollector(Collector):
    """The false-hit bound per category, read at scrape time from the verifier: the bound the operator set,
    the estimate (false share of hits on the calibration pairs), the verifier's probability threshold, and
    the share of same-answer pairs served with and without the verifier (what the bound costs)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        bound, estimate, met, threshold, hit_rate, unverified = families = self._families()
        for category, calibration in self.verifier.calibrations.items():
            bound.add_metric([category], calibration.bound)
            estimate.add_metric([category], calibration.estimate)
            met.add_metric([category], float(calibration.met))
            in_force = self.verifier.thresholds[category]
            if in_force is not None:
                threshold.add_metric([category], in_force)
            hit_rate.add_metric([category], calibration.hit_rate)
            unverified.add_metric([category], calibration.unverified_hit_rate)
        return iter(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (GaugeMetricFamily("blendgate_semantic_cache_false_hit_bound", "Largest share of hits allowed to "
                                  "be false (configured)", labels=["category"]),
                GaugeMetricFamily("blendgate_semantic_cache_false_hit_estimate", "False share of hits on the "
                                  "verifier's calibration pairs at the threshold in force", labels=["category"]),
                GaugeMetricFamily("blendgate_semantic_cache_false_hit_bound_met", "1 when the 95% upper bound of "
                                  "the estimate is within the bound, 0 when no verifier threshold meets it (the "
                                  "closest applies)",
                                  labels=["category"]),
                GaugeMetricFamily("blendgate_semantic_cache_verifier_threshold", "Verifier probability a candidate "
                                  "needs (absent: no calibration pairs, guards alone decide)", labels=["category"]),
                GaugeMetricFamily("blendgate_semantic_cache_verified_hit_rate", "Share of same-answer calibration "
                                  "pairs served with the verifier", labels=["category"]),
                GaugeMetricFamily("blendgate_semantic_cache_unverified_hit_rate", "Share of same-answer calibration "
                                  "pairs served without the verifier", labels=["category"]))


class FeedbackCollector(Collector):
    """What false-hit reports taught (feedback.FeedbackLearner), read at scrape time, per category and, unless the
    operator drops it, tenant: the reported false share of hits served (this replica, since start), its windowed
    95% upper bound (what the rule compares with the bound) and the thresholds in force at no load with the
    learned raises (similarity; verifier probability when the verifier is on). With the tenant label dropped,
    a category's figures are over all its tenants: summed counts, the largest upper bound and thresholds."""

    def __init__(self, feedback: FeedbackLearner, tenant_label: TenantLabel) -> None:
        self.feedback = feedback
        self.tenant_label = tenant_label

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        share, upper, cosine, verifier = families = self._families()
        for category in self.feedback.categories():
            rows = [(category, [])] if self.tenant_label.mode == "drop" else \
                [(t, self.tenant_label.values(t.tenant or "")) for t in category.tenants]
            for figures, tenant in rows:
                labels = [category.category, *tenant]
                if figures.share is not None:
                    share.add_metric(labels, figures.share)
                if figures.upper is not None:
                    upper.add_metric(labels, figures.upper)
                cosine.add_metric(labels, figures.cosine_threshold)
                if figures.verifier_threshold is not None:
                    verifier.add_metric(labels, figures.verifier_threshold)
        return iter(families)

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        labels = ["category", *self.tenant_label.names]
        return (GaugeMetricFamily("blendgate_semantic_cache_reported_false_share", "Share of the hits served "
                                  "(this replica, since start) that clients reported wrong", labels=labels),
                GaugeMetricFamily("blendgate_semantic_cache_reported_false_upper", "95% upper bound (Wilson) of the "
                                  "reported false share over the recent hits; past the bound, reports raise "
                                  "the thresholds", labels=labels),
                GaugeMetricFamily("blendgate_semantic_cache_learned_threshold", "Similarity threshold in force at "
                                  "no load, raised by false-hit reports", labels=labels),
                GaugeMetricFamily("blendgate_semantic_cache_learned_verifier_threshold", "Verifier probability a "
                                  "candidate needs, raised by false-hit reports (0: guards alone decide)",
                                  labels=labels))


class SemanticCacheMetrics:
    """The semantic cache's series on `registry`; `watch_policy` adds the policy gauges (once per registry)."""

    def __init__(self, registry: CollectorRegistry, tenant_label: TenantLabel | None = None) -> None:
        self.registry = registry
        self.tenant_label = tenant_label or TenantLabel()
        tenant = self.tenant_label.names
        self.lookups = Counter("blendgate_semantic_cache_lookups", "Semantic cache lookups by result "
                               "(hit, miss, bypass)", ["category", *tenant, "result"], registry=registry)
        self.scoped_lookups = Counter("blendgate_semantic_cache_scoped_lookups", "Semantic cache lookups by the "
                                      "question's sharing scope (tenant, user; none when decided before it, "
                                      "e.g. a category never cached) and result", ["scope", "result"],
                                      registry=registry)
        self.stores = Counter("blendgate_semantic_cache_stores", "Answers written to the semantic cache",
                              ["category", *tenant], registry=registry)
        self.evictions = Counter("blendgate_semantic_cache_evictions", "Entries removed, by reason "
                                 "(quota, expired, invalidated, corrupt)", ["category", "reason"], registry=registry)
        self.store_errors = Counter("blendgate_semantic_cache_store_errors", "Entry store calls that failed or "
                                    "timed out", ["operation"], registry=registry)
        self.rebuilds = Counter("blendgate_semantic_cache_rebuilds", "Full rebuilds of the in-memory index from "
                                "a scan of the store, by reason (start, recovery: the store was down at start-up, "
                                "lost_changes: changes past the replica's cursor were trimmed or lost with the "
                                "store's data)", ["reason"], registry=registry)
        self.store_up = Gauge("blendgate_semantic_cache_store_up", "1 while the entry store (Redis or embedded) "
                              "answers, 0 while the cache is bypassed", registry=registry)
        self.entries = Gauge("blendgate_semantic_cache_entries", "Entries in the in-memory index",
                             ["category", *tenant], registry=registry)
        self.verifier_rejections = Counter("blendgate_semantic_cache_verifier_rejections", "Candidate hits the "
                                           "verifier refused, by reason (numbers, entities, negation, comparison, "
                                           "opposites, exchanged: the guard that fired; classifier; feedback: "
                                           "refused by what false-hit reports taught, a learned probability "
                                           "threshold or a reported entry's neighbourhood)", ["category", "reason"],
                                           registry=registry)
        self.lookup_seconds = Histogram(
            "blendgate_semantic_cache_lookup_seconds", "Classification, index search and, on a hit, the entry "
            "fetch (the query embedding is not included)", ["result"], registry=registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

    def watch_policy(self, policy: CachePolicy) -> None:
        """Expose `policy` in force as gauges read at scrape time (PolicyCollector). Raises ValueError when the
        registry already has them (a second cache on one registry)."""
        self.registry.register(PolicyCollector(policy))

    def watch_bound(self, verifier: Verifier) -> None:
        """Expose the verifier's false-hit bound per category as gauges read at scrape time (BoundCollector)."""
        self.registry.register(BoundCollector(verifier))

    def watch_feedback(self, feedback: FeedbackLearner) -> None:
        """Expose what false-hit reports taught as gauges read at scrape time (FeedbackCollector)."""
        self.registry.register(FeedbackCollector(feedback, self.tenant_label))

    def lookup(self, category: str, tenant: str, result: str, scope: str) -> None:
        self.lookups.labels(category, *self.tenant_label.values(tenant), result).inc()
        self.scoped_lookups.labels(scope, result).inc()

    def stored(self, category: str, tenant: str) -> None:
        self.stores.labels(category, *self.tenant_label.values(tenant)).inc()

    def count_entries(self, tenant: str, category: str, counts: dict[tuple[str, str], int]) -> None:
        """Set the entries gauge of this tenant's label in `category` from the index's
        {(tenant, category): entries}; with the label dropped, the category's total over all tenants."""
        if self.tenant_label.mode == "drop":
            self.entries.labels(category).set(sum(n for (_, c), n in counts.items() if c == category))
        else:
            self.entries.labels(category, *self.tenant_label.values(tenant)).set(counts.get((tenant, category), 0))
