"""gateway/hit_audit.py's paths the live-gateway test (tests/e2e/test_hit_audit.py) cannot reach: an audit whose
generation fails labels nothing and frees its slot, and audits still running at shutdown are cancelled. The
backend is a stand-in that fails or never answers; everything else is the gateway's own."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import AsyncIterator

import numpy as np
from blendgate.gateway.backends.base import ChatBackend, ChatChunk
from blendgate.gateway.config import RetrievalSettings
from blendgate.gateway.hit_audit import HitAudits
from blendgate.gateway.loadable import Loadable
from blendgate.gateway.metrics.series import GatewayMetrics
from blendgate.gateway.rag import RagPlanner
from blendgate.gateway.schemas import ChatCompletionRequest
from blendgate.semcache.audit import HitAuditor
from blendgate.semcache.entries import CacheEntry
from blendgate.semcache.lookup import LookupResult
from blendgate.semcache.metrics import TenantLabel
from blendgate.semcache.settings import AuditSettings
from prometheus_client import CollectorRegistry


class StandIn(ChatBackend):
    """Fails at once (`fail`), or never answers."""

    kind = "stand-in"

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def start(self) -> None:
        return None

    def status(self) -> dict:
        return {"state": "ready"}

    async def stream(self, request, ctx) -> AsyncIterator[ChatChunk]:
        if self.fail:
            raise RuntimeError("the backend is down")
        await asyncio.Event().wait()
        yield ChatChunk(delta={})


def hit() -> LookupResult:
    entry = CacheEntry(tenant="t", category="factual", context="c", model="m", query="What is the capital of France?",
                       response={"content": "Paris.", "finish_reason": "stop"}, embedding=np.zeros(4, np.float32),
                       ttl_s=60)
    return LookupResult("hit", category="factual", similarity=0.95, entry=entry)


def audits() -> tuple[HitAudits, GatewayMetrics, dict[str, int]]:
    metrics = GatewayMetrics(CollectorRegistry(), TenantLabel())
    in_flight: dict[str, int] = defaultdict(int)
    runner = HitAudits(HitAuditor(AuditSettings(share=1.0)), RagPlanner(Loadable(), RetrievalSettings()), metrics,
                       lambda: lambda texts: np.eye(len(texts), 4, dtype=np.float32), in_flight)
    return runner, metrics, in_flight


QUESTION = {"role": "user", "content": "What's the capital of France?"}
REQUEST = ChatCompletionRequest.model_validate({"model": "m", "stream": True, "messages": [QUESTION]})


def test_a_failed_generation_counts_as_failed_and_frees_its_slot() -> None:
    async def run() -> None:
        runner, metrics, in_flight = audits()
        assert runner.start(StandIn(fail=True), REQUEST, "t", None, hit(), None, np.zeros(4, np.float32), 0.0)
        await asyncio.gather(*runner.tasks)
        assert metrics.audits.labels("factual", "failed")._value.get() == 1
        assert runner.auditor.in_flight == 0 and in_flight["m"] == 0 and not runner.tasks

    asyncio.run(run())


def test_audits_still_running_are_cancelled_at_shutdown() -> None:
    async def run() -> None:
        runner, metrics, in_flight = audits()
        assert runner.start(StandIn(fail=False), REQUEST, "t", None, hit(), None, np.zeros(4, np.float32), 0.0)
        await asyncio.sleep(0.05)
        assert in_flight["m"] == 1  # the audit counts in the model's load while it runs
        await runner.close()
        assert runner.auditor.in_flight == 0 and in_flight["m"] == 0
        assert metrics.audits.labels("factual", "failed")._value.get() == 0  # cancelled, not failed

    asyncio.run(run())


def test_no_audit_while_the_embedder_loads() -> None:
    runner, _, _ = audits()
    runner.embed = lambda: None
    assert not runner.start(StandIn(fail=True), REQUEST, "t", None, hit(), None, np.zeros(4, np.float32), 0.0)
    assert runner.auditor.in_flight == 0
