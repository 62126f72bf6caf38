"""Which semantic-cache hits are audited, and the verdict (semcache/audit.py: plain Python)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from blendgate.semcache.audit import HitAuditor
from blendgate.semcache.entries import CacheEntry
from blendgate.semcache.lookup import LookupResult
from blendgate.semcache.settings import AuditSettings, SemanticCacheSettings
from pydantic import ValidationError


def hit(similarity: float = 0.95, content: object = "Paris is the capital of France.") -> LookupResult:
    entry = CacheEntry(tenant="t", category="factual", context="c", model="m", query="What is the capital of France?",
                       response={"content": content, "finish_reason": "stop"}, embedding=np.zeros(4, np.float32),
                       ttl_s=60)
    return LookupResult("hit", category="factual", similarity=similarity, entry=entry)


def test_off_by_default_and_nothing_is_audited() -> None:
    auditor = HitAuditor(SemanticCacheSettings().audit)
    assert not auditor.enabled and auditor.admit(hit(), "t", 0.0) is None


def test_every_paraphrase_hit_at_share_one_gets_a_ticket_with_the_served_answer() -> None:
    auditor = HitAuditor(AuditSettings(share=1.0, max_in_flight=5))
    served = hit()
    ticket = auditor.admit(served, "t", 0.0)
    assert ticket is not None and auditor.in_flight == 1 and ticket.entry_id == served.entry.entry_id
    assert (ticket.tenant, ticket.category, ticket.cached_answer) == ("t", "factual", "Paris is the capital of France.")
    auditor.done()
    assert auditor.in_flight == 0


@pytest.mark.parametrize("result", [hit(similarity=1.0),  # the same question repeated: its own entry
                                    hit(content=""), hit(content=None),  # no text answer to compare
                                    LookupResult("miss", category="factual"), LookupResult("bypass")])
def test_repeats_misses_and_entries_without_a_text_answer_are_not_audited(result) -> None:
    assert HitAuditor(AuditSettings(share=1.0)).admit(result, "t", 0.0) is None


def test_the_in_flight_limit_and_the_load_level_hold_audits_back() -> None:
    auditor = HitAuditor(AuditSettings(share=1.0, max_in_flight=2))
    assert auditor.admit(hit(), "t", 0.0) and auditor.admit(hit(), "t", 0.0)
    assert auditor.admit(hit(), "t", 0.0) is None  # two running
    auditor.done()
    assert auditor.admit(hit(), "t", 0.5) is None  # loaded: the default allows level 0 only
    assert HitAuditor(AuditSettings(share=1.0, max_load_level=0.5)).admit(hit(), "t", 0.5) is not None
    assert auditor.admit(hit(), "t", 0.0) is not None


def test_the_share_is_a_sample() -> None:
    auditor = HitAuditor(AuditSettings(share=0.1, max_in_flight=10_000), rng=random.Random(7))
    admitted = sum(auditor.admit(hit(), "t", 0.0) is not None for _ in range(5000))
    assert 400 < admitted < 600  # binomial(5000, 0.1): mean 500, sd 21


def test_the_verdict_is_the_answers_agreement_against_the_setting() -> None:
    auditor = HitAuditor(AuditSettings(share=1.0, agreement=0.7))
    assert auditor.verdict(0.7) == "agree" and auditor.verdict(0.95) == "agree"
    assert auditor.verdict(0.69) == "disagree" and auditor.verdict(-0.2) == "disagree"


@pytest.mark.parametrize("bad", [{"share": 1.5}, {"share": -0.1}, {"agreement": 0.0}, {"max_in_flight": 0},
                                 {"max_load_level": 2}, {"sample": 0.1}])
def test_bad_audit_settings_are_refused(bad) -> None:
    with pytest.raises(ValidationError):
        SemanticCacheSettings(audit=bad)
