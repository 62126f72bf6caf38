"""Which chunk tokens a blend recomputes, and how many: the selection rule and the budget, in plain Python.

A blend reuses every chunk's cached KV and recomputes a few chunk tokens in full (CacheBlend, arXiv
2405.16444). This module holds the decisions that need no tensors, so they are testable anywhere:

- `SelectionRule`: how tokens are scored and picked. Scores are either the deviation of a token's cached KV
  from its fresh KV at an early layer (CacheBlend: values; keys; both), or the attention the question pays
  the token (query-aware selection, as ProphetKV arXiv 2602.02579, A3 arXiv 2511.17560 and QCFuse arXiv
  2606.05875 do: a cheap pass of the question over the cached KV, before anything is recomputed, says which
  chunk tokens its answer depends on), or their product. Options: each chunk's first tokens always
  recomputed (they act as attention sinks in a chunk computed alone: EPIC, arXiv 2410.15332), CacheBlend's
  gradual filtering (a wider set at the selection layer, narrowed at the next), and a budget split evenly
  over chunks instead of spent where the score is (Cache-Craft, arXiv 2502.15734, argues for the latter).
- the budget: a recompute ratio r (the share of chunk tokens recomputed), or, in the quality-targeted mode, a
  fidelity target: the fewest tokens whose scores cover that share of all chunk tokens' score, capped by r.
- `selected_count` / `aligned_count` / `targeted_count`: the counts, aligned to GEMM tiles on the GPU.
- `compute_share`: the honest cost of a blend: the share of (chunk token, layer) pairs computed, which
  counts the layers a deviation rule runs in full before it selects.

The kernels that compute the scores are in `blendgate.kernels.selection`; `chunkcache.blend` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

ScoreKind = Literal["value", "key", "kv", "attention", "attention_value", "attention_key"]
SCORE_KINDS: tuple[str, ...] = ("value", "key", "kv", "attention", "attention_value", "attention_key")
ChunkBudget = Literal["global", "uniform"]
ProbeWeights = Literal["auto", "model", "fp8"]
PROBE_WEIGHTS: tuple[str, ...] = ("auto", "model", "fp8")


@dataclass(frozen=True)
class SelectionRule:
    """How a blend picks the chunk tokens it recomputes.

    score: "value" / "key" / "kv" (squared L2 deviation of fresh from cached values, keys, or both, at
        `layer`; every token runs in full before it), "attention" (attention mass the question's tokens pay
        each chunk token in a probe pass over the cached KV, summed over heads, query rows and the first
        `probe_layers` layers; recomputed tokens then run from layer 0), "attention_value" and
        "attention_key" (the attention times the value or key deviation).
    layer: for deviation scores, the layer whose fresh KV is compared with the cache (>= 1: layer 0's KV
        depends on the token and position alone, so it never deviates).
    probe_layers: for attention scores, how many layers of the probe pass vote (None: all).
    probe_stride: the probe runs every `probe_stride`-th of those layers from layer 0 (the residual stream goes
        on unchanged past the others): votes from the whole depth at a fraction of the probe's cost (1: all;
        DEFAULT_RULE: 4, a quarter of the probe's weight reads for 0-3 points of the KL gap closed).
    sink_tokens: each chunk's first tokens, always recomputed (counted in the budget, of which they take at most
        half: see sink_count).
    gradual: CacheBlend's gradual filtering: keep `gradual` times the budget at `layer`, narrow to the budget
        by value deviation at the next layer (1.0: off).
    chunk_budget: "global" spends the budget on the top-scoring tokens wherever they are; "uniform" gives each
        chunk the same share of its tokens.
    drift_shift: the chunk tokens not recomputed get this share of the mean KV drift their chunk's recomputed
        tokens show at each layer (0: off; chunkcache/blend.py: _DriftShift).
    neighbours: each token scored at least as high as the best within this many tokens of it in its chunk, so
        that spans around the high-scoring tokens are recomputed together (0: off).
    drift_sinks: whether the sink tokens' drift counts in their chunk's mean (a chunk's first tokens, attention
        sinks when it was computed alone, drift unlike the rest of it).
    drift_bins: the drift mean is taken per this many equal parts of each chunk (shrunk toward the chunk's
        mean where a part has few recomputed tokens), so a token gets the drift measured near it (1: per chunk).
    probe_weights: which weights the probe pass's matrix products read (chunkcache/probe_weights.py). The pass
        only ranks chunk tokens, and a few dozen rows through a layer are bound by reading its weights, so an
        FP8 copy of them (e4m3, a scale per output channel: kernels/fp8.py) halves the probe's weight reads.
        "model" (the default): the model's own weights always: on the H200 (Llama-3-8B shapes, k = 8) the FP8
        copy saved 0.1 ms of a 25.9 ms blend (bench/results/ttft-2026-12-01.md: torch._scaled_mm at 64 rows
        reads far below the bandwidth its bf16 products reach, and the rows' quantisation costs launches), not
        worth ~7 GB of GPU memory. "auto": the FP8 copy where the hardware runs FP8 products (CUDA at compute capability
        8.9 or later, a float16 or bfloat16 model), the model's own weights elsewhere (CPU and float32 models:
        unchanged, no emulation cost); "fp8": the FP8 copy always, emulated with the same rounding where the
        hardware has no FP8 products (what the quality benchmark measures on a float32 model). The FP8 copy is
        made once per model and kept beside it: about half the bytes of the model's decoder layers in device
        memory (Llama-3-8B: ~7 GB).
    """

    score: ScoreKind = "attention"
    layer: int = 1
    probe_layers: int | None = None
    probe_stride: int = 1
    sink_tokens: int = 0
    gradual: float = 1.0
    chunk_budget: ChunkBudget = "global"
    drift_shift: float = 0.0
    neighbours: int = 0
    drift_sinks: bool = True
    drift_bins: int = 1
    probe_weights: ProbeWeights = "model"

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise ValueError(f"score must be one of {', '.join(SCORE_KINDS)}")
        if self.layer < 1:
            raise ValueError("the selection layer must be 1 or later (layer 0's KV never deviates)")
        if self.probe_layers is not None and self.probe_layers < 1:
            raise ValueError("probe_layers must be at least 1")
        if self.probe_stride < 1:
            raise ValueError("probe_stride must be at least 1")
        if self.sink_tokens < 0:
            raise ValueError("sink_tokens must not be negative")
        if self.gradual < 1.0:
            raise ValueError("gradual must be at least 1")
        if self.drift_shift < 0:
            raise ValueError("drift_shift must not be negative")
        if self.neighbours < 0:
            raise ValueError("neighbours must not be negative")
        if self.drift_bins < 1:
            raise ValueError("drift_bins must be at least 1")
        if self.chunk_budget not in ("global", "uniform"):
            raise ValueError("chunk_budget must be 'global' or 'uniform'")
        if self.probe_weights not in PROBE_WEIGHTS:
            raise ValueError(f"probe_weights must be one of {', '.join(PROBE_WEIGHTS)}")

    @property
    def query_aware(self) -> bool:
        """Whether the rule needs the question's probe pass."""
        return self.score.startswith("attention")

    @property
    def uses_deviation(self) -> bool:
        """Whether the rule compares fresh and cached KV (so layers before `layer` run every token)."""
        return self.score != "attention"

    def probe_layer_ids(self, num_layers: int) -> list[int]:
        """The layers the probe pass runs, for a model of `num_layers` layers."""
        return list(range(0, min(self.probe_layers or num_layers, num_layers), self.probe_stride))

    def first_selective_layer(self) -> int:
        """The first layer at which only selected chunk tokens are computed."""
        return self.layer if self.uses_deviation else 0


# The rule blending uses unless told otherwise: the question's attention, read in a probe over every fourth
# layer, picks the tokens, each chunk's first four are recomputed too, and the rest get half their chunk's
# measured drift. With the document context (chunk_context: document), at r = 0.15 on SmolLM2 (H200,
# bench/results/quality-2026-12-01.md runs 16-17) it closes 85%, 92% and 89% of the KL gap between full reuse
# and full prefill on NQ-open (k = 10, 20) and XQuAD's same-article paragraphs, at 96%, 104% and 97% of full
# prefill's accuracy; the probe over every layer closed 87%, 92% and 92%, but took 24.9 ms of TTFT against
# 21.5 (Llama-3-8B shapes, k = 8: 1.49x and 1.29x the ideal for the recompute, ttft-2026-12-01.md run F).
DEFAULT_RULE = SelectionRule(score="attention", sink_tokens=4, drift_shift=0.5, probe_stride=4)


def selected_count(chunk_tokens: int, ratio: float) -> int:
    """Chunk tokens recomputed at recompute ratio `ratio` (rounded up)."""
    return min(chunk_tokens, math.ceil(ratio * chunk_tokens - 1e-9))


# How far (relative) aligning to GEMM tiles may move the number of recomputed tokens.
ALIGNMENT_SLACK = 0.05


def aligned_count(count: int, other_rows: int, chunk_tokens: int, alignment: int) -> int:
    """`count` moved to the nearest value that makes the computed rows (count + other_rows) a multiple of
    `alignment`, if that moves it by at most ALIGNMENT_SLACK of itself; else `count` unchanged."""
    if alignment <= 1 or count in (0, chunk_tokens):
        return count
    aligned = round((count + other_rows) / alignment) * alignment - other_rows
    if 0 < aligned <= chunk_tokens and abs(aligned - count) <= ALIGNMENT_SLACK * count:
        return aligned
    return count


def targeted_count(sorted_scores: Sequence[float], target: float, cap: int) -> tuple[int, float]:
    """Quality-targeted budget: the fewest top tokens whose scores (sorted descending, non-negative) cover
    `target` (0..1] of the total, at most `cap`. Returns (count, covered share)."""
    if not 0.0 < target <= 1.0:
        raise ValueError("the fidelity target must be in (0, 1]")
    total = float(sum(sorted_scores))
    if total <= 0.0 or cap <= 0:
        return 0, 1.0 if total <= 0.0 else 0.0
    covered = 0.0
    for count, score in enumerate(sorted_scores[:cap], start=1):
        covered += float(score)
        if covered >= target * total:
            return count, covered / total
    return min(cap, len(sorted_scores)), covered / total


def sink_count(rule: SelectionRule, count: int, chunks: int) -> int:
    """Each chunk's first tokens recomputed as attention sinks for a budget of `count` tokens over `chunks`
    chunks: `rule.sink_tokens`, fewer when they would take more than half the budget (short chunks: the
    question's tokens keep the rest)."""
    if chunks <= 0:
        return 0
    return min(rule.sink_tokens, (count // 2) // chunks)


def uniform_counts(lengths: Sequence[int], count: int) -> list[int]:
    """`count` tokens spread over chunks of these lengths in proportion to their length (largest remainders),
    never more than a chunk has."""
    total = sum(lengths)
    if total == 0:
        return [0 for _ in lengths]
    exact = [count * n / total for n in lengths]
    counts = [min(n, math.floor(e)) for n, e in zip(lengths, exact)]
    order = sorted(range(len(lengths)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order:
        if sum(counts) >= count:
            break
        if counts[i] < lengths[i]:
            counts[i] += 1
    return counts


def compute_share(rule: SelectionRule, count: int, chunk_tokens: int, layers: int) -> float:
    """The share of (chunk token, layer) pairs a blend computes: every chunk token at the layers before the
    rule selects (and its QKV at the selection layer, counted as that layer), the widened set of gradual
    filtering at the selection layer, the selected tokens at every later layer. 0 for full reuse, 1 for
    full prefill. The question's own rows (and the probe pass over them) are not chunk tokens."""
    if chunk_tokens == 0 or count == 0:
        return 0.0
    if count >= chunk_tokens:
        return 1.0
    first = min(rule.first_selective_layer(), layers)
    if rule.uses_deviation:  # the selection layer's QKV for every token, then the selected rows from there
        pairs = first * chunk_tokens + min(chunk_tokens, math.ceil(rule.gradual * count)) * (layers > first)
        pairs += count * max(0, layers - first - 1)
    else:
        pairs = count * layers
    return pairs / (chunk_tokens * layers)
