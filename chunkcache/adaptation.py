"""Bandwidth adaptation for the shared chunk-cache tier: per chunk, fetch its encoded KV from Redis or recompute
it from text, whichever the estimates say is faster (CacheGen, arXiv 2310.07240, Section 6: per chunk the
option that meets the delay; recompute from text when fetching would be slower). Plain Python, no torch.

- `RateEstimate`: a rate measured as it happens (an exponential moving average of amount / seconds per
  observation, O(1) memory), with a documented prior before the first observation. Two are kept: the link's
  (encoded bytes per second of shared-tier reads, redis_tier.py feeds it) and the prefill's (chunk tokens
  precomputed per second, runner.py feeds it).
- `FetchPolicy.decide`: for one chunk the shared tier holds (its encoded size from `<prefix>:sizes`), the time
  to fetch and decode it against the time to recompute its tokens, as a `FetchDecision`.

Times are estimates: fetch = size / link rate + size / the codec's decode rate; recompute = (the chunk's
tokens + a forward pass's fixed cost, fallback.PrefillCosts.pass_tokens) / the prefill's token rate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .fallback import PrefillCosts

# Before the first shared-tier read: 1 Gbit/s (125 MB/s), a datacentre link shared with other traffic.
DEFAULT_LINK_BYTES_PER_S = 125e6
# Before the first precompute: SmolLM2-135M on 2 CPU cores, ~3 ms a token (fallback.py's measurement).
DEFAULT_PREFILL_TOKENS_PER_S = 333.0
# Each new observation's share of the moving average.
DEFAULT_SMOOTHING = 0.3

# Host decode rates, in encoded bytes per second, by codec name and level: bench/results/codec-2026-11-30.md's
# decode GB/s of bf16 output (one core of a loaded 2-core CPU, SmolLM2-135M's KV) divided by the level's
# ratio against bf16, so a size in encoded bytes converts directly. A codec not listed decodes at raw's rate.
DECODE_BYTES_PER_S: dict[tuple[str, int], float] = {
    ("raw", 0): 0.967e9 / 1.00,
    ("int8", 0): 0.795e9 / 1.93,
    ("int4", 0): 0.804e9 / 3.74,
    # cachegen: its rANS format's numpy decoder, format 2's rate (the section "cachegen format 2 on SmolLM2's KV":
    # formats 3 and 4 decode the same streams the same way; their own runs, on busier CPUs, measured 0.006-0.017)
    # over format 4's ratios (the section "cachegen format 4").
    ("cachegen", 0): 0.019e9 / 6.59,
    ("cachegen", 1): 0.018e9 / 4.44,
    ("cachegen", 2): 0.018e9 / 3.48,
    ("cachegen", 3): 0.015e9 / 2.62,
}
# Decode rates where the reader decodes on its GPU (chunkcache/codec: Codec.decode_device; cachegen entries on
# a GPU server, kernels/rans.py), in encoded bytes per second: a whole entry from host bytes on the H200
# (bench/results/codec-2026-11-30.md, `python bench/codec.py --synthetic llama3-8b qwen2.5-7b --device cuda`,
# Llama-3-8B's shape: bf16 GB/s over the level's ratio). The host's share of the path bounds it (the kernel
# alone decodes 67-69 GB/s of bf16), at 0.75-0.80 GB/s of entry bytes whatever the level: measured on format
# 2's levels, kept for formats 3 and 4 until their GPU run.
GPU_DECODE_BYTES_PER_S: dict[tuple[str, int], float] = {
    ("cachegen", 0): 4.205e9 / 5.57,
    ("cachegen", 1): 3.247e9 / 4.16,
    ("cachegen", 2): 2.630e9 / 3.31,
    ("cachegen", 3): 2.135e9 / 2.74,
}


def decode_rate(codec: str, level: int, on_gpu: bool = False) -> float:
    """The decode rate of a codec level, in encoded bytes per second: on the host (DECODE_BYTES_PER_S), or with
    `on_gpu` (the tier decodes on the blend's GPU) GPU_DECODE_BYTES_PER_S where it lists the level."""
    if on_gpu and (codec, level) in GPU_DECODE_BYTES_PER_S:
        return GPU_DECODE_BYTES_PER_S[(codec, level)]
    return DECODE_BYTES_PER_S.get((codec, level), DECODE_BYTES_PER_S[("raw", 0)])


class RateEstimate:
    """A rate (amount per second) measured as it happens: an exponential moving average of each observation's
    amount / seconds, `smoothing` being the newest one's share; `prior` until the first observation. Observations
    of no time or no amount are ignored. Thread-safe (the engine's worker thread observes, reports read)."""

    def __init__(self, prior: float, smoothing: float = DEFAULT_SMOOTHING) -> None:
        if prior <= 0 or not 0 < smoothing <= 1:
            raise ValueError("the prior must be positive and the smoothing in (0, 1]")
        self.prior = prior
        self.smoothing = smoothing
        self.samples = 0
        self._rate = prior
        self._lock = threading.Lock()

    @property
    def rate(self) -> float:
        """The estimate, in amount per second (the prior before any observation)."""
        return self._rate

    def observe(self, amount: float, seconds: float) -> None:
        """One measurement: `amount` (bytes, tokens) done in `seconds`."""
        if amount <= 0 or seconds <= 0:
            return
        with self._lock:
            measured = amount / seconds
            self._rate = measured if self.samples == 0 else (
                (1 - self.smoothing) * self._rate + self.smoothing * measured)
            self.samples += 1


@dataclass(frozen=True)
class FetchDecision:
    """One chunk's choice for the shared tier, from the policy (FetchPolicy) to the blender (runner.py), which
    fetches or recomputes it and puts `summary` in the prefill report's `shared_fetch`.

    fetch: read the entry from Redis (else recompute the chunk from its tokens); fetch_ms: the estimated time to
    fetch and decode it; recompute_ms: the estimated time to recompute it; reason: the figures behind the
    choice."""

    fetch: bool
    fetch_ms: float
    recompute_ms: float
    reason: str

    @property
    def summary(self) -> str:
        """The prefill report's words: "fetched" or "recomputed: <reason>"."""
        return "fetched" if self.fetch else f"recomputed: {self.reason}"


@dataclass
class AdaptationReport:
    """The policy's estimates, between FetchPolicy and the store's report (the admin API's chunk-cache view):
    the link's rate in bytes per second and the prefill's in tokens per second, with their observation counts
    (0: still the prior)."""

    link_bytes_per_s: float
    link_samples: int
    prefill_tokens_per_s: float
    prefill_samples: int


class FetchPolicy:
    """Decides per chunk between fetching it from the shared tier and recomputing it (see the module's
    docstring). `link` and `prefill` are measured by their users; `decode_bytes_per_s` is the codec's decode
    rate (decode_rate); `costs` gives a forward pass's fixed cost in tokens. Stateless apart from the estimates:
    the store counts what was done (kv_store.py)."""

    def __init__(self, decode_bytes_per_s: float = DECODE_BYTES_PER_S[("raw", 0)],
                 costs: PrefillCosts = PrefillCosts(), link: RateEstimate | None = None,
                 prefill: RateEstimate | None = None) -> None:
        self.decode_bytes_per_s = decode_bytes_per_s
        self.costs = costs
        self.link = link or RateEstimate(DEFAULT_LINK_BYTES_PER_S)
        self.prefill = prefill or RateEstimate(DEFAULT_PREFILL_TOKENS_PER_S)

    def decide(self, encoded_bytes: int, tokens: int) -> FetchDecision:
        """Fetch or recompute one chunk whose entry is `encoded_bytes` long in the shared tier and which has
        `tokens` tokens. Fetches only when the estimated fetch (transfer and decode) is no slower than the
        estimated recompute. The prefill's rate counts a pass's fixed cost as tokens (see the blender's
        measurement), so recompute = (tokens + costs.pass_tokens) / prefill rate."""
        link = self.link.rate
        fetch_s = encoded_bytes / link + encoded_bytes / self.decode_bytes_per_s
        recompute_s = (tokens + self.costs.pass_tokens) / self.prefill.rate
        fetch = fetch_s <= recompute_s
        reason = (f"link {link / 1e6:.3g} MB/s, fetch {fetch_s * 1e3:.3g} ms "
                  f"{'<=' if fetch else '>'} recompute {recompute_s * 1e3:.3g} ms")
        return FetchDecision(fetch, round(fetch_s * 1e3, 3), round(recompute_s * 1e3, 3), reason)

    def report(self) -> AdaptationReport:
        return AdaptationReport(self.link.rate, self.link.samples, self.prefill.rate, self.prefill.samples)
