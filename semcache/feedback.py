"""Learning from clients' false-hit reports without a restart: per tenant and category, the similarity and
verifier-probability thresholds a candidate hit must reach rise when the reported false share of hits
exceeds the category's false-hit bound, and fall back slowly toward the configured and calibrated values
while it stays within it.

Followed: vCache (Schroeder et al., "vCache: Verified Semantic Prompt Caching", arXiv 2502.03771). vCache
learns a decision threshold per cached embedding from observed correctness (a label per served or explored
hit) and serves only where the error stays within the bound δ at its confidence level. Here the labels are
the clients': a `POST /v1/semantic-cache/false-hit` is a wrong hit, a hit nobody reports counts as right (an
optimistic label: reports are the only signal, no hit is re-generated to check it). A reported entry is
invalidated at once (gateway/routers/semantic_cache.py), so there is no per-entry history to fit: the
learned state is per (tenant, category), the partition the entry lived in, and δ is the category's
`false_hit_bound` (CategoryPolicy), the bound the verifier is calibrated for (bound.py).

The rule, per (tenant, category), with the settings of `FeedbackSettings`:

- Every hit served counts (`served`). Its cosine similarity, its verifier probability and the thresholds in
  force when it was served are kept in a table of recent hits keyed by entry id (an LRU of `recent_hits`
  entries, each forgotten after `report_window_s`), so that a report can be matched to what was served.
- The false share is windowed: per hit served, the weighted hits become `hits * (1 - 1/window_hits) + 1` and
  the weighted reports `reports * (1 - 1/window_hits)`; a report adds 1 to the weighted reports. Its 95%
  upper bound is the Wilson bound of bound.py (`wilson_upper(reports, hits)`, 1.0 before any hit).
- A report of a hit served by a similarity match (not the same question repeated: raising a threshold cannot
  refuse that) whose windowed upper bound then exceeds the category's bound raises each threshold by its
  step, but no further than just above the reported hit (MARGIN past the amount by which it cleared the
  threshold in force): cosine raise += min(`cosine_step`, similarity - cosine threshold in force + MARGIN),
  at most `max_cosine_raise`; verifier raise += min(`probability_step`, probability - probability threshold in
  force + MARGIN), the probability threshold at most `max_probability`. The reported hit would be refused now;
  like vCache's boundary moving past an observed error, by one step per error at most.
- Every hit served while the windowed upper bound is within the bound multiplies both raises by
  0.5 ** (1 / `relax_half_life_hits`): they halve every `relax_half_life_hits` such hits, and a raise below
  1e-4 is dropped. The windowed upper bound with no reports falls to the bound only after about
  2.7 / bound hits (1.645² / bound), so a window shorter than that never relaxes; the default (2,000 hits)
  relaxes any bound of 0.0014 or more.
- A report that matches no hit this learner served (served by another replica, or more than
  `report_window_s` ago, or pushed out of the recent-hits table) counts in the share but moves no threshold.
- Per entry, as vCache's per-embedding threshold: the reported entry is invalidated, but its neighbourhood is
  remembered (its embedding and the similarity s of the reported hit, for its tenant, category and owner; the
  newest `reported_neighbourhoods` of each). A later candidate that is a near-duplicate of the reported entry
  (cosine to it at least s + MARGIN: nearer to it than the wrongly served question was) is served only to a
  question at least s + MARGIN similar to it: one no nearer than the reported question was is refused
  (`refused_nearby`), whatever the category's thresholds. The question wrongly served, stored with its own
  answer after the miss, lies at s from the reported entry, outside its neighbourhood.

The effective thresholds of a lookup are the category's similarity threshold in force (load-adaptive,
policy.py) plus the cosine raise, and the verifier's probability threshold (0 when guards alone decide) plus
the verifier raise. Memory is bounded: `recent_hits` served hits, `max_partitions` (tenant, category)
records and as many (tenant, category, owner) lists of at most `reported_neighbourhoods` neighbourhoods
(least recently used dropped first). Plain Python, no I/O: every method runs to completion in the
event loop without awaiting, so concurrent requests never see a half-applied update.

Replicas sharing Redis learn apart: the state lives in this replica's memory, starts at zero with each
process, and a report moves the thresholds of the replica that receives it (where the hit it names was
served, if it is in this replica's table). Balanced traffic gives each replica about the same share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cachetools import LRUCache, TTLCache

from .bound import wilson_upper
from .policy import CachePolicy
from .settings import FeedbackSettings

# How far past a reported hit a raised threshold goes (cosine similarity or probability).
MARGIN = 0.001
# A raise that has relaxed below this is dropped.
NEGLIGIBLE = 1e-4


@dataclass(frozen=True)
class ServedHit:
    """One hit as it was served: the hand-off from the lookup path (lookup.py) to the feedback learner, kept
    until the client may report it. `similarity` is the cosine of the query and the cached question;
    `cosine_threshold` the similarity threshold in force then (learned raise included); `probability` the
    verifier's probability and `probability_threshold` the one in force (raise included), both None when no
    verifier ran (verifier off, or the same question repeated, `exact`)."""

    tenant: str
    category: str
    similarity: float
    cosine_threshold: float
    probability: float | None = None
    probability_threshold: float | None = None
    exact: bool = False


@dataclass(frozen=True)
class ReportedNeighbourhood:
    """Where a reported hit came from: the reported entry's embedding (unit length, float32, shape
    (dimension,)) and the cosine `similarity` of the question it was wrongly served to. Near-duplicates of
    the entry need a question more similar than that (FeedbackLearner.refused_nearby)."""

    vector: np.ndarray
    similarity: float


@dataclass(frozen=True)
class LearnedRaise:
    """What the reports have added to a (tenant, category)'s thresholds: the hand-off from the feedback learner
    to the lookup path. `cosine` adds to the similarity threshold, `probability` to the verifier's."""

    cosine: float = 0.0
    probability: float = 0.0


NO_RAISE = LearnedRaise()


@dataclass
class PartitionFeedback:
    """The learned state of one (tenant, category): counts since start (`hits` served, `reports` received),
    the windowed counts the rule reads (see the module docstring), and the raises."""

    hits: int = 0
    reports: int = 0
    window_hits: float = 0.0
    window_reports: float = 0.0
    cosine_raise: float = 0.0
    probability_raise: float = 0.0

    @property
    def share(self) -> float | None:
        """Reported false share of the hits served since start (None before any hit)."""
        return self.reports / self.hits if self.hits else None

    @property
    def upper(self) -> float:
        """95% upper bound (Wilson) of the windowed false share; 1.0 before any hit."""
        return wilson_upper(min(self.window_reports, self.window_hits), self.window_hits) if self.window_hits \
            else 1.0

    @property
    def learned(self) -> LearnedRaise:
        return LearnedRaise(self.cosine_raise, self.probability_raise)


@dataclass(frozen=True)
class ReportOutcome:
    """What one false-hit report did (the hand-off from the learner back to the report's route): whether it
    matched a hit this learner served, and the (tenant, category)'s raises after it."""

    matched: bool
    raised: bool
    learned: LearnedRaise


@dataclass
class CategoryFeedback:
    """One category's online figures for operators (the hand-off from the learner to the admin stats and the
    /metrics collector): the configured `bound`, hits served and reports since start over the tenants given,
    the reported false `share`, the windowed 95% `upper` bound (largest over those tenants; None before any
    hit), and the learned
    thresholds in force at no load: `cosine_threshold` (configured + `cosine_raise`) and `verifier_threshold`
    (calibrated or fixed, 0 when guards alone decide, + `verifier_raise`; None when the verifier is off), the
    largest over those tenants. `tenants` breaks it down (the admin API shows tenants by name)."""

    category: str
    bound: float
    hits: int
    reports: int
    share: float | None
    upper: float | None
    cosine_threshold: float
    verifier_threshold: float | None
    cosine_raise: float = 0.0
    verifier_raise: float = 0.0
    tenants: list["CategoryFeedback"] = field(default_factory=list)
    tenant: str | None = None

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "category": self.category, "bound": self.bound, "hits": self.hits, "reports": self.reports,
            "reported_false_share": None if self.share is None else round(self.share, 4),
            "upper": None if self.upper is None else round(self.upper, 4),
            "cosine_threshold": round(self.cosine_threshold, 4),
            "verifier_threshold": None if self.verifier_threshold is None else round(self.verifier_threshold, 4),
            "cosine_raise": round(self.cosine_raise, 4), "verifier_raise": round(self.verifier_raise, 4)}
        if self.tenant is not None:
            shown["tenant"] = self.tenant
        else:
            shown["tenants"] = [t.as_dict() for t in self.tenants]
        return shown


class FeedbackLearner:
    """The learned thresholds of one replica, per (tenant, category): see the module docstring for the rule.

    `policy` gives each category's bound and configured similarity threshold; `verifier_thresholds` is the
    verifier's probability threshold per category (verifier.Verifier.thresholds: None where guards alone
    decide), or None when the verifier is off."""

    def __init__(self, settings: FeedbackSettings, policy: CachePolicy,
                 verifier_thresholds: dict[str, float | None] | None = None) -> None:
        self.settings = settings
        self.policy = policy
        self.verifier_thresholds = verifier_thresholds
        self.partitions: LRUCache[tuple[str, str], PartitionFeedback] = LRUCache(settings.max_partitions)
        self.recent: TTLCache[str, ServedHit] = TTLCache(settings.recent_hits, settings.report_window_s)
        self.neighbourhoods: LRUCache[tuple[str, str, str], list[ReportedNeighbourhood]] = \
            LRUCache(settings.max_partitions)
        self._keep = 1.0 - 1.0 / settings.window_hits
        self._relax = 0.5 ** (1.0 / settings.relax_half_life_hits)

    # -- the lookup path ---------------------------------------------------------------------------------------
    def learned(self, tenant: str, category: str) -> LearnedRaise:
        """The raises in force for a (tenant, category); NO_RAISE when nothing was learned."""
        state = self.partitions.get((tenant, category))
        return state.learned if state is not None else NO_RAISE

    def probability_threshold(self, category: str, learned: LearnedRaise) -> float | None:
        """The verifier probability a candidate of `category` needs beyond the verifier's own verdict: its
        threshold (0 when guards alone decide) plus the raise; None while nothing is raised (the verdict
        alone decides) or the verifier is off."""
        if self.verifier_thresholds is None or learned.probability <= 0.0:
            return None
        return (self.verifier_thresholds.get(category) or 0.0) + learned.probability

    def refused_nearby(self, tenant: str, category: str, owner: str, vector: np.ndarray, similarity: float) -> bool:
        """Whether a candidate entry of `owner` (embedding `vector`, unit length) at `similarity` to the
        question lies in a reported entry's neighbourhood without the question being nearer to it than the
        reported hit's question was (see the module docstring)."""
        for reported in self.neighbourhoods.get((tenant, category, owner), ()):
            if similarity < reported.similarity + MARGIN and float(vector @ reported.vector) >= \
                    reported.similarity + MARGIN:
                return True
        return False

    def served(self, entry_id: str, hit: ServedHit) -> None:
        """A hit was served from `entry_id`: count it, remember it for a report, and relax the partition's
        raises while its windowed false share is within the bound."""
        state = self._state(hit.tenant, hit.category)
        state.hits += 1
        state.window_hits = state.window_hits * self._keep + 1.0
        state.window_reports *= self._keep
        self.recent[entry_id] = hit
        if state.upper <= self._bound(hit.category):
            state.cosine_raise = self._relaxed(state.cosine_raise)
            state.probability_raise = self._relaxed(state.probability_raise)

    # -- reports -----------------------------------------------------------------------------------------------
    def report(self, entry_id: str, tenant: str, category: str, owner: str | None = None,
               vector: np.ndarray | None = None) -> ReportOutcome:
        """A client of `tenant` reports the hit it was served from `entry_id` (of `category`; the entry's
        `owner` and embedding `vector` where still known) as wrong. The served hit is matched (and forgotten:
        a second report of it is not matched again), counted, the partition's thresholds raised as the rule
        says, and the entry's neighbourhood remembered."""
        hit = self.recent.pop(entry_id, None)
        if category not in self.policy:
            return ReportOutcome(False, False, NO_RAISE)  # a category no longer configured: nothing to learn
        if hit is not None and (hit.tenant, hit.category) != (tenant, category):
            hit = None  # never another partition's values
        state = self._state(tenant, category)
        state.reports += 1
        state.window_reports += 1.0
        raised = False
        if hit is not None and not hit.exact:
            if state.upper > self._bound(category):
                raised = self._raise(state, hit)
            if owner is not None and vector is not None and self.settings.reported_neighbourhoods:
                self._remember(tenant, category, owner, ReportedNeighbourhood(vector, hit.similarity))
        return ReportOutcome(hit is not None, raised, state.learned)

    def _remember(self, tenant: str, category: str, owner: str, neighbourhood: ReportedNeighbourhood) -> None:
        key = (tenant, category, owner)
        kept = self.neighbourhoods.get(key, [])
        self.neighbourhoods[key] = [*kept, neighbourhood][-self.settings.reported_neighbourhoods:]

    def _raise(self, state: PartitionFeedback, hit: ServedHit) -> bool:
        settings = self.settings
        before = state.learned
        cleared = max(0.0, hit.similarity - hit.cosine_threshold)
        state.cosine_raise = min(settings.max_cosine_raise,
                                 state.cosine_raise + min(settings.cosine_step, cleared + MARGIN))
        if hit.probability is not None and hit.probability_threshold is not None and \
                self.verifier_thresholds is not None:
            base = self.verifier_thresholds.get(hit.category) or 0.0
            cleared = max(0.0, hit.probability - hit.probability_threshold)
            state.probability_raise = min(max(settings.max_probability - base, 0.0),
                                          state.probability_raise + min(settings.probability_step, cleared + MARGIN))
        return state.learned != before

    # -- operators' view ---------------------------------------------------------------------------------------
    def categories(self) -> list[CategoryFeedback]:
        """Per cached category, its online figures over all tenants, with the per-tenant breakdown of the
        tenants that have a record (see CategoryFeedback)."""
        by_category: dict[str, list[tuple[str, PartitionFeedback]]] = {}
        for (tenant, category), state in list(self.partitions.items()):
            by_category.setdefault(category, []).append((tenant, state))
        shown = []
        for name, configured in self.policy.categories.items():
            if not configured.cached:
                continue
            tenants = [self._figures(name, [state], tenant) for tenant, state in sorted(by_category.get(name, []))]
            overall = self._figures(name, [state for _, state in by_category.get(name, [])])
            overall.tenants = tenants
            shown.append(overall)
        return shown

    def _figures(self, category: str, states: list[PartitionFeedback], tenant: str | None = None) -> CategoryFeedback:
        configured = self.policy.category(category)
        hits, reports = sum(s.hits for s in states), sum(s.reports for s in states)
        cosine = max((s.cosine_raise for s in states), default=0.0)
        probability = max((s.probability_raise for s in states), default=0.0)
        verifier = None
        if self.verifier_thresholds is not None:
            verifier = (self.verifier_thresholds.get(category) or 0.0) + probability
        upper = max((s.upper for s in states if s.window_hits), default=None)
        return CategoryFeedback(category, configured.false_hit_bound, hits, reports, reports / hits if hits else None,
                                upper, configured.threshold + cosine, verifier, cosine,
                                probability if verifier is not None else 0.0, tenant=tenant)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _state(self, tenant: str, category: str) -> PartitionFeedback:
        state = self.partitions.get((tenant, category))
        if state is None:
            state = self.partitions[(tenant, category)] = PartitionFeedback()
        return state

    def _bound(self, category: str) -> float:
        return self.policy.category(category).false_hit_bound

    def _relaxed(self, value: float) -> float:
        value *= self._relax
        return value if value >= NEGLIGIBLE else 0.0
