"""SpeCache's policy for the local engine: which requests offload their KV, each one's GPU budget, and which
KV pairs a decode step reads. Plain Python (no torch), tested on its own.

SpeCache (arXiv 2503.16163) keeps a long request's full-precision KV in CPU memory and, per decode step, reads
only a budget of KV pairs on the GPU: the first `sink_tokens` positions (attention sinks, Xiao et al.
arXiv 2309.17453), the last `recent_tokens` positions (the recent window, which also holds the tokens whose keys
are not yet quantised: the low-bit keys are made a group of 32 tokens at a time, kernels/lowbit_keys.py), and
the top-k other positions by their scores against the low-bit keys. A request whose context fits its budget
reads everything (the same attention as full KV). The pairs for step t+1 are predicted from step t's query
and prefetched; `PrefetchStats` counts how many of the pairs a step wanted were prefetched (SpeCache's
prefetch hit rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUANTISATION_GROUP = 32  # tokens per group of low-bit keys (kernels/lowbit_keys.GROUP)


class SpeCacheSettings(BaseModel):
    """The `specache` settings of the local engine (off by default until measured on a GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    min_context_tokens: int = Field(4096, ge=1)  # shorter prompts keep their KV on the GPU
    gpu_budget_tokens: int | None = Field(None, ge=1)  # full-precision KV pairs a request reads per step
    gpu_budget_fraction: float = Field(0.1, gt=0, le=1)  # of the context, when gpu_budget_tokens is not set
    sink_tokens: int = Field(4, ge=0)
    # the unquantised tail (under a group) and the next step's candidates stay within the window
    recent_tokens: int = Field(64, ge=2 * QUANTISATION_GROUP)
    bits: int = Field(2, ge=1, le=2)

    @model_validator(mode="after")
    def _budget_holds_the_fixed_part(self) -> "SpeCacheSettings":
        if self.gpu_budget_tokens is not None and self.gpu_budget_tokens <= self.sink_tokens + self.recent_tokens:
            raise ValueError(f"specache.gpu_budget_tokens ({self.gpu_budget_tokens}) must be larger than "
                             f"sink_tokens + recent_tokens ({self.sink_tokens + self.recent_tokens})")
        return self

    def applies(self, context_tokens: int) -> bool:
        """Whether a request of this many prompt tokens offloads its KV."""
        return self.enabled and context_tokens >= self.min_context_tokens

    def budget(self, context_tokens: int) -> "RequestBudget":
        """A request's budget: gpu_budget_tokens, or gpu_budget_fraction of its context, and never less than
        its sinks and recent window plus one top-k pair."""
        fixed = self.sink_tokens + self.recent_tokens
        tokens = self.gpu_budget_tokens or math.ceil(self.gpu_budget_fraction * context_tokens)
        return RequestBudget(self.sink_tokens, self.recent_tokens, max(tokens, fixed + 1) - fixed)


@dataclass(frozen=True)
class StepSelection:
    """What one decode step reads of a request of `length` positions, from the policy to the SpeCache decoder:
    positions [0, sinks) and [recent_start, length) always, and `top_k` of the candidates [sinks, recent_start)
    per KV head: all of them when they are no more than the budget's top-k (`scored` False: the step reads the
    whole context, as full KV does), else the best-scored ones."""

    length: int
    sinks: int
    recent_start: int
    top_k: int

    @property
    def candidates(self) -> int:
        return self.recent_start - self.sinks

    @property
    def scored(self) -> bool:
        return self.candidates > self.top_k

    @property
    def pairs(self) -> int:
        """KV pairs read per KV head: the GPU slots the step uses."""
        return self.sinks + self.top_k + self.length - self.recent_start

    def fixed_positions(self) -> list[int]:
        return [*range(self.sinks), *range(self.recent_start, self.length)]


@dataclass(frozen=True)
class RequestBudget:
    """One request's GPU budget in KV pairs per KV head and layer: sinks + recent window + top_k."""

    sink_tokens: int
    recent_tokens: int
    top_k: int

    @property
    def tokens(self) -> int:
        return self.sink_tokens + self.recent_tokens + self.top_k

    def select(self, length: int) -> StepSelection:
        """The step's selection for a request whose KV holds `length` positions (the new token's included)."""
        sinks = min(self.sink_tokens, length)
        recent_start = max(sinks, length - self.recent_tokens)
        return StepSelection(length, sinks, recent_start, min(self.top_k, recent_start - sinks))


@dataclass
class PrefetchStats:
    """Counts of the top-k pairs steps wanted, how many of them the previous step's prediction had prefetched,
    and the pairs copied host-to-device (prefetched and fetched on a miss)."""

    wanted: int = 0
    hits: int = 0
    copied: int = 0

    def record(self, wanted: int, hits: int, copied: int) -> None:
        if not 0 <= hits <= wanted or copied < 0:
            raise ValueError(f"a step cannot hit {hits} of {wanted} wanted pairs, or copy {copied}")
        self.wanted += wanted
        self.hits += hits
        self.copied += copied

    @property
    def hit_rate(self) -> float:
        """Prefetched share of the wanted top-k pairs (1.0 before any)."""
        return self.hits / self.wanted if self.wanted else 1.0
