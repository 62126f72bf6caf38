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


@dataclass(frozen=True)
class PrefillCosts:
    """The cost model blend_fallback decides with, in tokens computed: `pass_tokens` for each forward pass of
    its own (a chunk not cached yet is computed alone), `placement_tokens` for placing a cached chunk."""

    pass_tokens: float = DEFAULT_PASS_COST_TOKENS
    placement_tokens: float = DEFAULT_PLACEMENT_COST_TOKENS


def blend_fallback(chunk_lengths: Sequence[int], hits: Sequence[bool], recompute_ratio: float,
                   costs: PrefillCosts = PrefillCosts()) -> str | None:
    """Why blending these chunks would be slower than prefilling the prompt in full, or None when it is not.

    chunk_lengths: each chunk's tokens; hits: whether each is cached; recompute_ratio: the share of chunk
    tokens the blend recomputes (the most it may, for a fidelity target). Both prefills compute the prompt's
    other tokens; blending saves computing (1 - recompute_ratio) of the chunk tokens, and pays per chunk: a
    forward pass of its own for each chunk not cached (its tokens are computed there once, for the cache, as
    a full prefill computes them) and a placement for each cached one. Blending is slower when it pays more
    than it saves."""
    if len(chunk_lengths) != len(hits):
        raise ValueError("one hit flag per chunk is needed")
    misses = sum(not hit for hit in hits)
    overhead = misses * costs.pass_tokens + (len(hits) - misses) * costs.placement_tokens
    saved = sum(chunk_lengths) * (1.0 - recompute_ratio)
    if overhead <= saved:
        return None
    return (f"blending {len(hits)} chunks ({misses} not cached) would cost about {overhead:.0f} tokens of "
            f"per-chunk work to save {saved:.0f}: slower than a full prefill")
