"""When blending a prompt's chunks would be slower than prefilling it in full: a cost model in plain Python
(no model, no torch), which chunkcache/runner.py asks before it blends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# What one forward pass costs beyond its tokens, and placing one cached chunk, in tokens computed: SmolLM2-135M
# on 2 CPU cores (2026-11-30) took ~60 ms for a pass over 1 token against ~3 ms a token (~20 tokens), and the
# issue's 700 five-token documents 117 s blended against 27 s in full (~30 tokens a chunk).
DEFAULT_PASS_COST_TOKENS = 24.0
DEFAULT_PLACEMENT_COST_TOKENS = 1.0


# The most a measured pass cost may be taken for, in tokens: a first pass still compiling or a stalled host can
# time one size far above the other, and the fit would then refuse every blend.
MAX_MEASURED_PASS_TOKENS = 4096.0


@dataclass(frozen=True)
class PrefillTiming:
    """One chunk size's prefill on this device: `tokens` precomputed in `seconds` (the fastest of a few passes,
    after a warm-up)."""

    tokens: int
    seconds: float


@dataclass(frozen=True)
class PrefillCalibration:
    """A device's prefill cost, measured at two chunk sizes and fitted as seconds = (tokens + pass_tokens) /
    tokens_per_s: a forward pass's fixed cost (its launches, its per-layer host work) counted as tokens, as
    PrefillCosts and the fetch policy (adaptation.py) count it. On a GPU that fixed cost is most of a small
    chunk's pass: SmolLM2-135M on an H200 computed a prompt of 5 NQ passages in 22 ms whole against 104 ms
    chunk by chunk (medians of 4 prompts: bench/results/fetch-ttft-2026-12-01.md, run 3), where the CPU default
    (24 tokens) said blending paid."""

    small: PrefillTiming
    large: PrefillTiming

    def __post_init__(self) -> None:
        if not 0 < self.small.tokens < self.large.tokens or self.small.seconds <= 0 or self.large.seconds <= 0:
            raise ValueError("a calibration needs two chunk sizes, the first smaller, with positive times")

    @property
    def seconds_per_token(self) -> float:
        """The slope of the fit (the large size's mean cost a token where noise makes the slope not positive)."""
        slope = (self.large.seconds - self.small.seconds) / (self.large.tokens - self.small.tokens)
        return slope if slope > 0 else self.large.seconds / self.large.tokens

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    @property
    def pass_tokens(self) -> float:
        """A pass's fixed cost in tokens: the fit's intercept over its slope, within [0, MAX_MEASURED_PASS_TOKENS]."""
        intercept = self.small.seconds - self.seconds_per_token * self.small.tokens
        return min(MAX_MEASURED_PASS_TOKENS, max(0.0, intercept / self.seconds_per_token))


@dataclass(frozen=True)
class PrefillCosts:
    """The cost model blend_fallback decides with, in tokens computed: `pass_tokens` for each forward pass that
    computes chunks not cached yet (blend.precompute_chunks), `placement_tokens` for placing a cached chunk."""

    pass_tokens: float = DEFAULT_PASS_COST_TOKENS
    placement_tokens: float = DEFAULT_PLACEMENT_COST_TOKENS


@dataclass(frozen=True)
class FallbackDecision:
    """ChunkBlender.weigh's answer for one prompt: `reason` why it is prefilled in full (None: it blends), and
    `hits`, per chunk in prompt order, whether its KV would be read from the store (for the report)."""

    reason: str | None
    hits: list[bool]


def blend_fallback(chunk_lengths: Sequence[int], hits: Sequence[bool], recompute_ratio: float,
                   costs: PrefillCosts = PrefillCosts(), fetch_tokens: Sequence[float] | None = None,
                   passes: int | None = None) -> str | None:
    """Why blending these chunks would be slower than prefilling the prompt in full, or None when it is not.

    chunk_lengths: each chunk's tokens; hits: whether each is cached; recompute_ratio: the share of chunk
    tokens the blend recomputes (the most it may, for a fidelity target); fetch_tokens: per chunk, the time
    reading it from the shared tier would take (adaptation.FetchDecision.fetch_ms), in tokens of prefill at the
    measured rate; 0 for a chunk in a local tier or not read (None: all 0); `passes`: the forward passes that
    compute the uncached chunks (blend.precompute_chunks runs chunks after the same prefix side by side in
    one; None: one a chunk). Both prefills compute the prompt's other tokens; blending saves computing
    (1 - recompute_ratio) of the chunk tokens, and pays: each pass's fixed cost for the chunks not cached
    (their tokens are computed there once, for the cache; a full prefill computes them too, and queues them to
    be computed for the cache again afterwards), a placement for each cached chunk, and the fetch of each one
    read from the shared tier. Blending is slower when it pays more than it saves: a prompt whose chunks are
    each cheaper to fetch than to compute alone may still be cheaper to prefill whole (SmolLM2-135M on an H200
    at 1 Gbit/s: five passages fetched and blended in 73 ms, prefilled whole in 18,
    bench/results/fetch-ttft-2026-12-01.md run 6)."""
    if len(chunk_lengths) != len(hits) or (fetch_tokens is not None and len(fetch_tokens) != len(hits)):
        raise ValueError("one hit flag (and fetch cost) per chunk is needed")
    misses = sum(not hit for hit in hits)
    passes = misses if passes is None else (passes if misses else 0)
    fetching = sum(fetch_tokens) if fetch_tokens is not None else 0.0
    overhead = passes * costs.pass_tokens + (len(hits) - misses) * costs.placement_tokens + fetching
    saved = sum(chunk_lengths) * (1.0 - recompute_ratio)
    if overhead <= saved:
        return None
    fetched = f", {fetching:.0f} of them fetching from the shared tier," if fetching else ""
    computed = f" in {passes} pass{'es' if passes != 1 else ''}" if passes != misses else ""
    return (f"blending {len(hits)} chunks ({misses} not cached{computed}) would cost about {overhead:.0f} tokens "
            f"of per-chunk work{fetched} to save {saved:.0f}: slower than a full prefill")
