"""The shared tier's bandwidth adaptation (chunkcache/adaptation.py) on constructed numbers: the rate estimates
(prior, moving with measurements) and the per-chunk choice between fetching and recomputing."""

from __future__ import annotations

import pytest
from blendgate.chunkcache.adaptation import DEFAULT_LINK_BYTES_PER_S, FetchPolicy, RateEstimate, decode_rate
from blendgate.chunkcache.fallback import PrefillCosts

COSTS = PrefillCosts(pass_tokens=20.0)


def policy(link: float, tokens_per_s: float = 1000.0, decode: float = 1e12) -> FetchPolicy:
    """A policy whose estimates are `link` bytes/s and `tokens_per_s` (priors), decoding at `decode` bytes/s."""
    return FetchPolicy(decode, COSTS, RateEstimate(link), RateEstimate(tokens_per_s))


def test_the_prior_holds_until_the_first_measurement_then_the_estimate_moves() -> None:
    link = RateEstimate(DEFAULT_LINK_BYTES_PER_S, smoothing=0.5)
    assert link.rate == 125e6 and link.samples == 0
    link.observe(1e6, 0.0)  # no time: ignored
    link.observe(0, 1.0)  # nothing read: ignored
    assert link.rate == 125e6 and link.samples == 0
    link.observe(1e6, 1.0)  # the first measurement replaces the prior
    assert link.rate == pytest.approx(1e6) and link.samples == 1
    link.observe(3e6, 1.0)  # then half and half
    assert link.rate == pytest.approx(2e6) and link.samples == 2
    with pytest.raises(ValueError):
        RateEstimate(0.0)


def test_a_fast_link_fetches() -> None:
    # 100 KB at 1 GB/s: 0.1 ms; 100 tokens + 20 at 1000 tokens/s: 120 ms.
    decision = policy(1e9).decide(100_000, tokens=100)
    assert decision.fetch and decision.summary == "fetched"
    assert decision.fetch_ms == pytest.approx(0.1) and decision.recompute_ms == pytest.approx(120.0)


def test_a_slow_link_recomputes_and_says_why() -> None:
    # 100 KB at 200 KB/s: 500 ms > 120 ms.
    decision = policy(200e3).decide(100_000, tokens=100)
    assert not decision.fetch
    assert decision.fetch_ms == pytest.approx(500.0) and decision.recompute_ms == pytest.approx(120.0)
    assert decision.summary == "recomputed: link 0.2 MB/s, fetch 500 ms > recompute 120 ms"


def test_decoding_counts_in_the_fetch() -> None:
    # A fast link, but a decoder of 500 KB/s: 200 ms to decode 100 KB > 120 ms.
    decision = policy(1e12, decode=500e3).decide(100_000, tokens=100)
    assert not decision.fetch and decision.fetch_ms == pytest.approx(200.0, rel=1e-3)
    assert decode_rate("cachegen", 0) < decode_rate("int8", 0) < decode_rate("raw", 0)
    assert decode_rate("unknown", 7) == decode_rate("raw", 0)


def test_measurements_turn_the_choice() -> None:
    chosen = policy(1e9)
    assert chosen.decide(100_000, tokens=100).fetch
    for _ in range(20):  # the link turns out to give 100 KB/s
        chosen.link.observe(100_000, 1.0)
    assert chosen.link.rate == pytest.approx(100e3, rel=1e-2)
    assert not chosen.decide(100_000, tokens=100).fetch
    report = chosen.report()
    assert (report.link_samples, report.prefill_samples) == (20, 0)


@pytest.mark.parametrize("size", [1, 1_000, 10_000, 100_000, 1_000_000, 10_000_000])
@pytest.mark.parametrize("link", [1e4, 1e6, 1e8, 1e10])
@pytest.mark.parametrize("tokens", [1, 64, 512])
def test_never_a_fetch_slower_than_recompute(size: int, link: float, tokens: int) -> None:
    decision = policy(link, decode=1e8).decide(size, tokens)
    assert decision.fetch == (decision.fetch_ms <= decision.recompute_ms)
