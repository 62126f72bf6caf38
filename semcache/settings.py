"""Settings of the semantic cache: storage, per-category policies and the load-adaptive bounds.

The categories, their seed examples and their policies come from `default_categories.yaml` unless the
configuration file gives its own `semantic_cache.categories` (which then replaces the whole list).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_CATEGORIES_FILE = Path(__file__).with_name("default_categories.yaml")


def _compiled(rules: list[str]) -> list[str]:
    for rule in rules:
        try:
            re.compile(rule)
        except re.error as exc:
            raise ValueError(f"rule {rule!r} is not a valid regular expression: {exc}") from None
    return rules


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CategoryPolicy(_Strict):
    """One query category: how it is recognised and how its answers are cached."""

    name: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    cached: bool = True
    # Cosine similarity (unit-length embeddings) a cached question needs to answer a new one.
    threshold: float = Field(0.9, gt=0.0, le=1.0)
    ttl_s: float = Field(86_400, gt=0)
    # Most entries per tenant in this category; past it the policy's victim is evicted.
    quota: int = Field(10_000, ge=1)
    eviction: Literal["lru", "lfu"] = "lru"
    # Who may be served an answer cached in this category: everyone under the API key ("tenant") or only the
    # end user who asked it ("user": the request's `user` field or the x-blendgate-user header).
    scope: Literal["tenant", "user"] = "tenant"
    # Under full load the threshold falls to this and the TTL rises to this (None: unchanged).
    threshold_under_load: float | None = Field(None, gt=0.0, le=1.0)
    ttl_under_load_s: float | None = Field(None, gt=0)
    # Labelled queries whose mean embedding is the category's centroid.
    examples: list[str] = Field(default_factory=list)
    # Regular expressions (case-insensitive); a query matching one belongs to this category outright.
    rules: list[str] = Field(default_factory=list)
    # Largest share of this category's hits allowed to answer another question (vCache's error bound). The
    # verifier's probability threshold is calibrated so that the 95% upper bound of the false share of hits
    # on its labelled pairs stays within it (semcache/bound.py).
    false_hit_bound: float = Field(0.02, gt=0.0, lt=1.0)
    # A fixed probability threshold for the verifier instead of the calibrated one (None: calibrated).
    verifier_threshold: float | None = Field(None, ge=0.0, le=1.0)

    @field_validator("rules")
    @classmethod
    def _compiles(cls, rules: list[str]) -> list[str]:
        return _compiled(rules)

    @model_validator(mode="after")
    def _bounds(self) -> "CategoryPolicy":
        if self.threshold_under_load is not None and self.threshold_under_load > self.threshold:
            raise ValueError(f"category {self.name}: threshold_under_load must not exceed threshold")
        if self.ttl_under_load_s is not None and self.ttl_under_load_s < self.ttl_s:
            raise ValueError(f"category {self.name}: ttl_under_load_s must not be below ttl_s")
        if self.cached and not self.examples and not self.rules:
            raise ValueError(f"category {self.name}: give examples or rules, or nothing can fall into it")
        return self


class LoadSettings(_Strict):
    """When a model counts as loaded: queue depth or recent latency at or past the mark starts loosening,
    twice the mark is full load (the categories' *_under_load bounds)."""

    queue_depth_mark: int = Field(8, ge=1)
    latency_mark_ms: float = Field(10_000, gt=0)
    # Weight of the newest request in the latency moving average.
    latency_smoothing: float = Field(0.2, gt=0.0, le=1.0)


class FeedbackSettings(_Strict):
    """How clients' false-hit reports move each (tenant, category)'s thresholds online (semcache/feedback.py,
    whose docstring gives the rule)."""

    enabled: bool = True
    # Most a report raises the similarity threshold (cosine) and the verifier's probability threshold by.
    cosine_step: float = Field(0.01, ge=0.0, le=0.1)
    probability_step: float = Field(0.05, ge=0.0, le=0.5)
    # Ceilings: the largest cosine raise, and the highest verifier probability threshold a raise reaches.
    max_cosine_raise: float = Field(0.05, ge=0.0, le=0.2)
    max_probability: float = Field(0.99, gt=0.0, le=1.0)
    # Hits the windowed false share weighs (exponentially); it must exceed about 2.7 / false_hit_bound for a
    # category's raises to relax at all.
    window_hits: int = Field(2000, ge=10)
    # Served hits within the bound over which a raise halves.
    relax_half_life_hits: int = Field(500, ge=1)
    # Served hits remembered for a report (their similarity and probability), and for how long.
    recent_hits: int = Field(100_000, ge=1)
    report_window_s: float = Field(86_400, gt=0)
    # (tenant, category) records kept, and (tenant, category, owner) lists of reported neighbourhoods (least
    # recently used dropped first).
    max_partitions: int = Field(10_000, ge=1)
    # Reported entries whose neighbourhood stays refused, per tenant, category and owner (newest kept); 0: none.
    reported_neighbourhoods: int = Field(64, ge=0)


class AuditSettings(_Strict):
    """Hit audits (semcache/audit.py): a sampled share of the hits served is answered again by the model in the
    background and the new answer compared with the cached one; a cached answer that says something else counts
    as a false-hit report (feedback.py learns from it) and its entry is invalidated."""

    # The share of hits (similarity matches, not the same question repeated) audited; 0: none. Each audit
    # costs one generation by the model behind the cache.
    share: float = Field(0.0, ge=0.0, le=1.0)
    # The cosine similarity of the two answers (the cache's embedder) at or above which they agree.
    agreement: float = Field(0.7, gt=0.0, le=1.0)
    # Audits running at once, at most; a hit sampled while as many run is not audited.
    max_in_flight: int = Field(2, ge=1)
    # Audits start only while the model's load level (policy.LoadMonitor, 0 to 1) is at most this: 0, only
    # while it is below both load marks.
    max_load_level: float = Field(0.0, ge=0.0, le=1.0)


class HnswSettings(_Strict):
    m: int = Field(16, ge=4, le=128)
    ef_construction: int = Field(100, ge=8)
    ef_search: int = Field(64, ge=8)


def default_categories() -> list[CategoryPolicy]:
    data = yaml.safe_load(DEFAULT_CATEGORIES_FILE.read_text())
    return [CategoryPolicy.model_validate(c) for c in data["categories"]]


def default_asker_rules() -> list[str]:
    return list(yaml.safe_load(DEFAULT_CATEGORIES_FILE.read_text())["asker_rules"])


class SemanticCacheSettings(_Strict):
    enabled: bool = True
    # redis://host:port/db. Left out: an embedded in-process store (entries last until the gateway stops).
    redis_url: str | None = None
    # Bound on every Redis call; past it the request goes on without the cache.
    redis_timeout_ms: float = Field(100, gt=0)
    # How often a cache whose Redis is down tries it again.
    redis_retry_s: float = Field(2.0, gt=0)
    key_prefix: str = Field("blendgate:semcache", min_length=1)
    # Requests sampled hotter than this are never cached or answered from the cache.
    max_cacheable_temperature: float = Field(0.7, ge=0.0, le=2.0)
    # Where a query goes when no rule matches and no category has examples.
    default_category: str = "conversational"
    # Nearest cached questions checked per lookup (they must also match model, context and freshness).
    candidates: int = Field(8, ge=1, le=256)
    # A query whose runner-up category scores within this margin of its own (nearest-centroid cosine) also
    # searches that category's entries, at the stricter of the two thresholds: paraphrases that fall on either
    # side of a category boundary still find each other. 0 searches the query's own category only.
    neighbour_margin: float = Field(0.06, ge=0.0, le=2.0)
    hnsw: HnswSettings = Field(default_factory=HnswSettings)
    load: LoadSettings = Field(default_factory=LoadSettings)
    categories: list[CategoryPolicy] = Field(default_factory=default_categories)
    # Regular expressions (case-insensitive) for questions that refer to the asker (first-person pronouns and
    # possessives): such a question is user-scoped whatever its category, and not cached without a user.
    asker_rules: list[str] = Field(default_factory=default_asker_rules)
    # Candidate hits pass the verifier (semcache/verifier.py: guards and a classifier over the pair) before
    # they are served; off serves every candidate at or above the category's threshold.
    verifier: bool = True
    # Verifier weights trained on your own pairs (`blendgate tune-thresholds --verifier-out FILE`); left out:
    # the default shipped with blendgate (trained on Quora Question Pairs).
    verifier_path: Path | None = None
    # Learning from false-hit reports (semcache/feedback.py).
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    # Re-generating a sampled share of hits to check the cached answers (semcache/audit.py); off by default.
    audit: AuditSettings = Field(default_factory=AuditSettings)
    # The embedder the thresholds were tuned with; another embedder gets a warning at start-up.
    thresholds_tuned_for: str = "all-MiniLM-L6-v2"

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix:// (e.g. redis://localhost:6379/0)")
        return url

    @field_validator("asker_rules")
    @classmethod
    def _asker_rules_compile(cls, rules: list[str]) -> list[str]:
        return _compiled(rules)

    @model_validator(mode="after")
    def _categories(self) -> "SemanticCacheSettings":
        names = [c.name for c in self.categories]
        if not names:
            raise ValueError("semantic_cache.categories must not be empty")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"category names must be unique; repeated: {', '.join(repeated)}")
        if self.default_category not in names:
            raise ValueError(f"default_category '{self.default_category}' is not one of the categories "
                             f"({', '.join(names)})")
        return self

    def category(self, name: str) -> CategoryPolicy:
        return next(c for c in self.categories if c.name == name)
