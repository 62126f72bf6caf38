"""Load-adaptive policy: how loaded each model is, and the threshold and TTL in force at that load.

Plain Python with no I/O, so the arithmetic is testable on its own. Load is measured per model, because
loosening the cache only helps the model that is overloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .settings import CategoryPolicy, LoadSettings


@dataclass(frozen=True)
class EffectivePolicy:
    category: str
    cached: bool
    threshold: float
    ttl_s: float
    load_level: float
    scope: str = "tenant"  # the category's sharing scope (CategoryPolicy.scope)

    def as_dict(self) -> dict:
        return {"category": self.category, "cached": self.cached, "scope": self.scope,
                "threshold": round(self.threshold, 4),
                "ttl_s": round(self.ttl_s, 1), "load_level": round(self.load_level, 3)}


def effective_policy(policy: CategoryPolicy, level: float) -> EffectivePolicy:
    """At level 0 the configured values; at 1 the *_under_load bounds; linear in between."""
    level = min(max(level, 0.0), 1.0)
    low = policy.threshold_under_load if policy.threshold_under_load is not None else policy.threshold
    high_ttl = policy.ttl_under_load_s if policy.ttl_under_load_s is not None else policy.ttl_s
    return EffectivePolicy(policy.name, policy.cached, policy.threshold - level * (policy.threshold - low),
                           policy.ttl_s + level * (high_ttl - policy.ttl_s), level, policy.scope)


class LoadMonitor:
    """Queue depth (read from the backend when asked) and a moving average of recent request latency."""

    def __init__(self, settings: LoadSettings) -> None:
        self.settings = settings
        self._queue_depth: dict[str, Callable[[], int]] = {}
        self._latency_ms: dict[str, float] = {}

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        self._queue_depth[model] = depth

    def observe_latency(self, model: str, latency_ms: float) -> None:
        """Latency of a request the model answered (cache hits are not the model's latency)."""
        previous = self._latency_ms.get(model)
        alpha = self.settings.latency_smoothing
        self._latency_ms[model] = latency_ms if previous is None else (1 - alpha) * previous + alpha * latency_ms

    def signals(self, model: str) -> dict[str, float]:
        depth = self._queue_depth.get(model)
        return {"queue_depth": float(depth()) if depth else 0.0, "latency_ms": self._latency_ms.get(model, 0.0)}

    def level(self, model: str) -> float:
        """0 below both marks, rising to 1 at twice the higher of the two ratios' marks."""
        signals = self.signals(model)
        ratio = max(signals["queue_depth"] / self.settings.queue_depth_mark,
                    signals["latency_ms"] / self.settings.latency_mark_ms)
        return min(max(ratio - 1.0, 0.0), 1.0)

    def models(self) -> list[str]:
        return sorted(set(self._queue_depth) | set(self._latency_ms))


class CachePolicy:
    """The categories' configured policies and the values in force for each model at its current load.

    Read by the lookup path (threshold, TTL, quota, eviction, scope), the replica sync (which categories
    exist), the operators' view (`in_force`) and the scrape-time policy gauges (metrics.PolicyCollector). No side
    effects."""

    def __init__(self, categories: list[CategoryPolicy], load: LoadMonitor) -> None:
        self.categories = {c.name: c for c in categories}
        self.load = load

    def __contains__(self, category: str) -> bool:
        return category in self.categories

    def category(self, name: str) -> CategoryPolicy:
        """The configured policy of a category; KeyError for a category not configured."""
        return self.categories[name]

    def policy_for(self, model: str, category: str) -> EffectivePolicy:
        """The category's threshold and TTL in force for `model` at its load level now."""
        return effective_policy(self.categories[category], self.load.level(model))

    def in_force(self, models: list[str]) -> dict[str, Any]:
        """What operators see: per model, its load signals and each category's values in force."""
        return {model: {"load": {**self.load.signals(model), "level": round(self.load.level(model), 3)},
                        "categories": [self.policy_for(model, name).as_dict() for name in self.categories]}
                for model in models}
