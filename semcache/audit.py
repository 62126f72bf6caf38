"""Hit audits: which of the semantic cache's hits are answered again by the model, and what the comparison
says (plain Python, no I/O: the gateway runs the generation and the embedding, gateway/hit_audit.py).

Followed: vCache (Schroeder et al., "vCache: Verified Semantic Prompt Caching", arXiv 2502.03771), which learns
its thresholds from labels of served hits and gets them by re-generating a share of them ("exploration") and
comparing the answers. Here a sampled `share` of the hits served (AuditSettings) is answered again, for the new
question, by the model behind the cache, after the cached answer was served; the two answers are embedded by
the cache's embedder and compared by cosine similarity. Below `agreement` the cached answer says something
else than the model says now: the hit is counted as a false-hit report (feedback.py raises its tenant's and
category's thresholds as for a client's report) and the entry is invalidated. Agreement labels nothing: a
hit nobody reports already counts as right.

Which hits: similarity matches only (the same question repeated is answered by the entry stored for it), at
most `max_in_flight` audits at once, and only while the model's load level (policy.LoadMonitor) is at most
`max_load_level`: an audit is a generation the client does not wait for, and the first thing to drop under
load. An answer comparison by embeddings is a heuristic: two right answers worded apart can score below a high
`agreement`, and two answers that differ in one number score high; the default (0.7) refuses answers about
another subject, which is what the cache's false hits are on real question pairs (bench/results/
semcache-qqp-2026-11-30.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from .lookup import SAME_QUESTION, LookupResult
from .settings import AuditSettings

AuditVerdict = Literal["agree", "disagree"]


@dataclass(frozen=True)
class AuditTicket:
    """One admitted audit (HitAuditor.admit to the gateway's runner): the hit's entry, its tenant and category,
    and the answer the cache served."""

    entry_id: str
    tenant: str
    category: str
    cached_answer: str


class HitAuditor:
    """Admits hits to be audited (sampling, the in-flight limit, the load level) and reads the answers'
    agreement as a verdict. `rng`: the sampling's source (seeded in tests)."""

    def __init__(self, settings: AuditSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.in_flight = 0

    @property
    def enabled(self) -> bool:
        return self.settings.share > 0

    def admit(self, result: LookupResult, tenant: str, load_level: float) -> AuditTicket | None:
        """A ticket when this hit is to be audited (call `done` once its audit ends), else None: not a hit of
        an entry with a text answer, the same question repeated, the model loaded past `max_load_level`, as
        many audits running as allowed, or not drawn in the sample."""
        settings = self.settings
        entry = result.entry
        if settings.share <= 0 or result.status != "hit" or entry is None or result.category is None:
            return None
        answer = entry.response.get("content") if isinstance(entry.response, dict) else None
        if not isinstance(answer, str) or not answer.strip():
            return None
        if result.similarity is None or result.similarity >= SAME_QUESTION:
            return None
        if load_level > settings.max_load_level or self.in_flight >= settings.max_in_flight:
            return None
        if self.rng.random() >= settings.share:
            return None
        self.in_flight += 1
        return AuditTicket(entry.entry_id, tenant, result.category, answer)

    def done(self) -> None:
        """An admitted audit ended (whatever its outcome)."""
        self.in_flight = max(0, self.in_flight - 1)

    def verdict(self, agreement: float) -> AuditVerdict:
        """The verdict for the two answers' cosine similarity."""
        return "agree" if agreement >= self.settings.agreement else "disagree"
