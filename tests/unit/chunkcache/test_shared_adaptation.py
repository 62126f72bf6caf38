"""Bandwidth adaptation wired into the shared tier, on a real Redis: the store's `locate` (entry sizes in one round
trip, the policy's choice per chunk), and the blending runner on the real SmolLM2 reading the shared tier through
a throttling TCP proxy on loopback: at 200 KB/s chunks are recomputed and the report says why, unthrottled they
are fetched."""

from __future__ import annotations

import uuid

import pytest
import torch
from bench_modules import bench_module
from blendgate.chunkcache.adaptation import FetchPolicy, RateEstimate, decode_rate
from blendgate.chunkcache.codec import Codec
from blendgate.chunkcache.fallback import DEFAULT_PASS_COST_TOKENS, PrefillCosts
from blendgate.chunkcache.kv_store import ChunkCacheStore
from blendgate.chunkcache.redis_tier import RedisTier
from blendgate.chunkcache.runner import BlendingRunner
from blendgate.chunkcache.tiers import MemoryTier
from chunk_entries import key, kv
from test_chunkcache_runner import BLEND_ALWAYS, DOCUMENTS, rag_prompt

ENCODED = len(Codec().encode(key(0), kv(0)))  # bytes of one test entry in Redis
ThrottlingProxy = bench_module("throttle.py").ThrottlingProxy


@pytest.fixture
def prefix() -> str:
    return f"test:chunk-kv:{uuid.uuid4().hex[:8]}"


def test_locate_gives_local_hits_shared_sizes_and_the_policys_choice(redis_server, prefix) -> None:
    writer = ChunkCacheStore([MemoryTier("cpu", 1 << 20, "cpu")],
                             shared=RedisTier(redis_server.url, 1 << 24, key_prefix=prefix, timeout_s=0.5))
    # A link of 1 KB/s (the prior) and a prefill of 1000 tokens/s: fetching an entry (~ENCODED bytes) takes ~1 s,
    # recomputing 8 tokens 8 ms.
    shared = RedisTier(redis_server.url, 1 << 24, key_prefix=prefix, timeout_s=0.5, link=RateEstimate(1e3))
    policy = FetchPolicy(1e12, PrefillCosts(pass_tokens=0), link=shared.link, prefill=RateEstimate(1e3))
    reader = ChunkCacheStore([MemoryTier("cpu", 1 << 20, "cpu")], shared=shared, adaptation=policy)
    try:
        for n in (0, 1):
            writer.put(key(n), kv(n), recompute_cost=16)
        writer.shared.flush()
        reader.put(key(1), kv(1), recompute_cost=16, share=False)  # held locally as well
        local, fetched, absent = reader.locate([key(1), key(0), key(9)], [8, 8, 8])
        assert local.local and local.hit and local.shared_bytes is None and local.decision is None
        assert not absent.local and not absent.hit and absent.shared_bytes is None
        assert fetched.shared_bytes == ENCODED and not fetched.decision.fetch and not fetched.hit
        assert fetched.decision.fetch_ms == pytest.approx(ENCODED, rel=1e-3)  # ENCODED bytes at 1 KB/s, in ms
        assert fetched.decision.recompute_ms == pytest.approx(8.0)
        assert shared.entry_sizes([key(0), key(9)]) == [ENCODED, None]
        assert reader.get(key(0), shared=False) is None  # the policy's choice: Redis not asked, a miss
        reader.note_recomputed()
        report = reader.report()
        assert report["adaptation"]["recomputed"] == 1 and report["misses"] == 1
        assert report["adaptation"]["link_samples"] == 0  # nothing read yet
        # A read measures the link: loopback is far faster than the 1 KB/s prior, so the entry is fetched now.
        assert shared.read(key(0)) is not None and shared.link.samples == 1
        # Against recomputing 200 tokens (200 ms at the prior): even a loopback read slowed 50-fold on a busy
        # machine (0.165 MB/s was seen with two pytest workers, 8.9 ms against 8 tokens' 8 ms) is the cheaper.
        assert reader.locate([key(0)], [200])[0].decision.fetch
    finally:
        writer.close()
        reader.close()


def runner_through(url: str, prefix: str, loaded_model, adapt: bool = True) -> BlendingRunner:
    """A replica of its own (empty local tiers) whose shared tier is at `url`, storing int4 entries."""
    codec = Codec("int4", 0)
    shared = RedisTier(url, 1 << 28, key_prefix=prefix, timeout_s=5.0, codec=codec)
    policy = FetchPolicy(decode_rate("int4", 0), BLEND_ALWAYS, link=shared.link) if adapt else None
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")], shared=shared, adaptation=policy)
    return BlendingRunner(loaded_model, store, costs=BLEND_ALWAYS)


def test_a_slow_link_recomputes_and_a_fast_one_fetches(redis_server, prefix, loaded_model, tokenizer) -> None:
    slow = ThrottlingProxy(redis_server.port, rate=200e3)
    fast = ThrottlingProxy(redis_server.port, rate=None)
    first = runner_through(redis_server.url, prefix, loaded_model)
    over_slow = runner_through(f"redis://127.0.0.1:{slow.port}/0", prefix, loaded_model)
    over_fast = runner_through(f"redis://127.0.0.1:{fast.port}/0", prefix, loaded_model)
    try:
        with torch.inference_mode():
            _, state = first.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend"))  # every chunk into Redis
            assert state.report.shared_fetch == ["not cached"] * 3 and state.report.hits == [False] * 3
            first.store.shared.flush()
            # Before any read the link's prior (1 Gbit/s) says fetch; this read measures 200 KB/s.
            _, state = over_slow.prefill(rag_prompt(tokenizer, DOCUMENTS[:1], "blend"))
            assert state.report.shared_fetch == ["fetched"] and state.report.hits == [True]
            link = over_slow.store.shared.link
            assert 50e3 < link.rate < 250e3, link.rate
            # The third chunk recurs: computed for its first place, it is a local hit for its second.
            _, state = over_slow.prefill(rag_prompt(tokenizer, [*DOCUMENTS[1:], DOCUMENTS[1]], "blend"))
            assert state.report.hits == [False, False, True]
            assert state.report.shared_fetch[2] == "local"
            for words in state.report.shared_fetch[:2]:
                assert words.startswith("recomputed: link 0.") and "> recompute" in words, words
            assert state.report.as_dict()["shared_fetch"] == state.report.shared_fetch  # in the response
            adaptation = over_slow.store.report()["adaptation"]
            assert adaptation["recomputed"] == 2 and adaptation["link_samples"] >= 1
            assert adaptation["prefill_samples"] == 1  # the two chunks recomputed were timed, in one pass
            assert over_slow.store.shared.report().hits == 2  # the system prompt's and the first chunk's
            # Unthrottled, every chunk is fetched.
            _, state = over_fast.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend"))
            assert state.report.shared_fetch == ["fetched"] * 3 and state.report.hits == [True] * 3
            assert over_fast.store.report()["adaptation"]["recomputed"] == 0
    finally:
        for runner in (first, over_slow, over_fast):
            runner.store.close()
        slow.close()
        fast.close()


@pytest.mark.parametrize("adapt", [True, False])
def test_the_local_backend_adapts_unless_set_off(redis_server, prefix, loaded_model, tmp_path, adapt) -> None:
    from blendgate.gateway.backends.local import LocalBackend
    from blendgate.gateway.config import ChunkCacheSettings, LocalModelConfig

    settings = ChunkCacheSettings.model_validate({
        "disk_dir": str(tmp_path), "codec": {"name": "int8"},
        "redis": {"url": redis_server.url, "key_prefix": prefix, "adapt": adapt}})
    backend = LocalBackend(LocalModelConfig(name="m"), cache_dir=tmp_path, max_running=1, max_waiting=1,
                           chunk_cache=settings)
    runner = backend._runner(loaded_model)
    try:
        policy = backend.store.adaptation
        if adapt:
            assert policy.link is backend.store.shared.link  # measured by the tier's reads
            assert policy.decode_bytes_per_s == decode_rate("int8", 0)
            # "auto" on the CPU: the CPU's default pass cost (measured on a GPU only), the policy's rate measured.
            assert policy.costs == PrefillCosts(DEFAULT_PASS_COST_TOKENS, settings.placement_cost_tokens)
            assert runner.costs == policy.costs
            assert backend.prefill_costs_view() == {"pass_tokens": DEFAULT_PASS_COST_TOKENS,
                                                    "placement_tokens": settings.placement_cost_tokens,
                                                    "pass_cost": "auto"}
            assert policy.prefill.samples == 1
            assert "adaptation" in backend.store.report()
        else:
            assert policy is None and "adaptation" not in backend.store.report()
    finally:
        backend.store.close()


def test_the_prefill_rate_is_measured_at_start_up_without_storing_anything(redis_server, prefix, loaded_model,
                                                                          monkeypatch) -> None:
    runner = runner_through(redis_server.url, prefix, loaded_model)
    measured = []
    real = runner.blender.measure_prefill
    monkeypatch.setattr(runner.blender, "measure_prefill",
                        lambda **options: measured.append(real(tokens=32, **options)) or measured[-1])
    try:
        policy = runner.store.adaptation
        assert policy.prefill.samples == 0  # the prior: SmolLM2 on 2 CPU cores
        costs = runner.blender.calibrate(30.0, 2.0)  # a configured pass cost: the policy decides with it
        assert costs == policy.costs == PrefillCosts(30.0, 2.0) and len(measured) == 1
        assert policy.prefill.samples == 1 and policy.prefill.rate == pytest.approx(
            (measured[0].large.tokens + 30.0) / measured[0].large.seconds)
        report = runner.store.report()
        assert all(tier["entries"] == 0 for tier in report["tiers"] if not tier.get("shared"))
        assert runner.store.shared.report().writes == 0
        plain = runner_through(redis_server.url, prefix, loaded_model, adapt=False)
        monkeypatch.setattr(plain.blender, "measure_prefill", lambda **options: measured.append(None))
        # No fetch policy and the CPU: nothing to measure for ("auto" is the CPU's default there).
        assert plain.blender.calibrate("auto", 1.0) == PrefillCosts(DEFAULT_PASS_COST_TOKENS, 1.0)
        assert len(measured) == 1
        plain.store.close()
    finally:
        runner.store.close()


def test_a_blend_after_a_prefetch_reports_what_the_prefetch_decided(redis_server, prefix, loaded_model,
                                                                     tokenizer) -> None:
    # An SGLang pass finds its requests' chunks first (ChunkBlender.prefetch), then blends. Over a link believed
    # to run at 1 KB/s the prefetch recomputes the chunks Redis holds (and stores them locally): the blend's
    # report gives the prefetch's reason, not "not cached" from a second lookup that finds them local by then,
    # and the blend asks the store nothing more.
    first = runner_through(redis_server.url, prefix, loaded_model)
    codec = Codec("int4", 0)
    shared = RedisTier(redis_server.url, 1 << 28, key_prefix=prefix, timeout_s=5.0, codec=codec,
                       link=RateEstimate(1e3))
    store = ChunkCacheStore([MemoryTier("cpu", 1 << 30, "cpu")], shared=shared,
                            adaptation=FetchPolicy(decode_rate("int4", 0), BLEND_ALWAYS, link=shared.link))
    replica = BlendingRunner(loaded_model, store, costs=BLEND_ALWAYS)
    try:
        with torch.inference_mode():
            first.prefill(rag_prompt(tokenizer, DOCUMENTS, "blend"))  # every chunk into Redis
            first.store.shared.flush()
            prompt = rag_prompt(tokenizer, DOCUMENTS, "blend")
            known = replica.blender.prefetch([(prompt, 0)])
            assert all(source.local for source in replica.blender.locate(prompt))  # computed and stored
            _, report = replica.blender.blend(prompt, known=known)
        assert report.hits == [False] * 3
        for words in report.shared_fetch:
            assert words.startswith("recomputed: link ") and "> recompute" in words, words
    finally:
        first.store.close()
        replica.store.close()
