"""SpeCache's policy for the local engine: which requests offload their KV, each one's GPU budget, and which
KV pairs a decode step reads. Plain Python (no torch), tested on its own.

SpeCache (arXiv 2503.16163) keeps a long request's full-precision KV in CPU memory and, per decode step, reads
only a budget of KV pairs on the GPU: the first `sink_tokens` positions (attention sinks, Xiao et al.
arXiv 2309.17453), the last `recent_tokens` positions (the recent window, which also holds the tokens whose keys
are not yet quantised: the low-bit keys are made a group of 32 or 64 tokens at a time, kernels/lowbit_keys.py),
and the top-k slots: each step selects the `selected_share` of them its query's scores against the low-bit keys
rank best (they are made resident), and reads every top-k slot, so the slots it did not select still hold pairs
earlier steps selected (a cache of selected pairs: a step copies at most what it selects, the rest of its reads
are exact pairs that cost no copy). With the share at 1 (the default) every slot holds this step's top-k, as
SpeCache reads. A request whose context fits its budget reads everything (the same attention as full KV).
With `select_every` above 1 (default 1: every step) a request's step selects only every that many steps; the
steps between read the top-k slots as the last selecting step and its prefetch left them, with no scores, no
top-k and no copies (attention's temporal locality, which the prefetch relies on too; a position leaving the
recent window in between waits for the next selecting step). `selects` decides it for a batch.
With `speculate` (SpeCache's speculative token) a budget has one more slot, `RequestBudget.scratch`, for the
pair of a guess of the next token, whose queries choose the next step's pairs (engine/specache.py).
The pairs for step t+1 are predicted from step t's query and prefetched; `PrefetchStats` counts how many of
the pairs a step wanted were prefetched (SpeCache's prefetch hit rate). `gpu_kv_bytes` counts a request's GPU
bytes (budget, low-bit keys and their scales, residency table) against its bf16 full KV: the memory the issue's
bar (8x smaller, goal 10x) is about.

Settings for >= 8x at 32k tokens (`SpeCacheSettings.eightfold()`): 1-bit keys in groups of 64 tokens (3/64
of a bf16 pair: 1/8 of a key's bytes of codes, 1/16 of float16 zero points and steps), a recent window of 128
(two groups) and a budget of 1/16 of the context: 9.1x at 32k tokens for Llama-3-8B's shapes; a budget of
1/20 gives 10.2x. The defaults (2-bit keys in groups of 32, 1/10 of the context) give about 5x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUANTISATION_GROUPS = (32, 64)  # tokens per group of low-bit keys (kernels/lowbit_keys.GROUPS)
QUANTISATION_GROUP = QUANTISATION_GROUPS[0]  # the default (kernels/lowbit_keys.GROUP)
RESIDENCY_BYTES = 8  # per top-k slot, layer and KV head: the position it holds (int64, engine/specache.py)
SCALE_BYTES = 4  # per group and channel: a float16 zero point and a float16 step


class SpeCacheSettings(BaseModel):
    """The `specache` settings of the local engine (off by default until measured on a GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    min_context_tokens: int = Field(4096, ge=1)  # shorter prompts keep their KV on the GPU
    gpu_budget_tokens: int | None = Field(None, ge=1)  # full-precision KV pairs a request reads per step
    gpu_budget_fraction: float = Field(0.1, gt=0, le=1)  # of the context, when gpu_budget_tokens is not set
    sink_tokens: int = Field(4, ge=0)
    # the unquantised tail (under a group) and the next step's candidates stay within the window: at least
    # two groups
    recent_tokens: int = Field(64, ge=2 * QUANTISATION_GROUP)
    # the share of the top-k slots a step selects by its scores; the others keep earlier steps' pairs (read too)
    selected_share: float = Field(1.0, gt=0, le=1)
    # a request's steps select (score, top-k, copy, prefetch) every this many steps; the others read the slots
    select_every: int = Field(1, ge=1, le=64)
    # SpeCache's speculative token: each step also decodes a guess of the next token (a second row, its KV in
    # one scratch slot of the budget), whose queries choose the pairs prefetched for the next step; a step whose
    # token is the last step's guess reads them without selecting on its own
    speculate: bool = False
    bits: int = Field(2, ge=1, le=2)
    group: Literal[32, 64] = QUANTISATION_GROUP  # tokens sharing a low-bit key's zero point and step

    @model_validator(mode="after")
    def _budget_holds_the_fixed_part(self) -> "SpeCacheSettings":
        if self.recent_tokens < 2 * self.group:
            raise ValueError(f"specache.recent_tokens ({self.recent_tokens}) must hold two groups of low-bit keys "
                             f"({2 * self.group} tokens at group {self.group})")
        if self.speculate and self.select_every > 1:
            raise ValueError("specache.speculate chooses every step's pairs: it does not go with select_every above 1")
        if self.gpu_budget_tokens is not None and self.gpu_budget_tokens <= self.sink_tokens + self.recent_tokens:
            raise ValueError(f"specache.gpu_budget_tokens ({self.gpu_budget_tokens}) must be larger than "
                             f"sink_tokens + recent_tokens ({self.sink_tokens + self.recent_tokens})")
        return self

    @classmethod
    def eightfold(cls, **overrides) -> "SpeCacheSettings":
        """The settings that take a 32k-token request's GPU KV below 1/8 of its bf16 full KV (9.1x for
        Llama-3-8B's shapes, `gpu_kv_bytes`): 1-bit keys in groups of 64, a recent window of two groups, a
        budget of 1/16 of the context; `overrides` (e.g. enabled=True) as the constructor's keywords."""
        return cls(**{"bits": 1, "group": 64, "recent_tokens": 128, "gpu_budget_fraction": 1 / 16, **overrides})

    def applies(self, context_tokens: int) -> bool:
        """Whether a request of this many prompt tokens offloads its KV."""
        return self.enabled and context_tokens >= self.min_context_tokens

    def budget(self, context_tokens: int) -> "RequestBudget":
        """A request's budget: gpu_budget_tokens, or gpu_budget_fraction of its context, and never less than
        its sinks and recent window plus one top-k pair."""
        fixed = self.sink_tokens + self.recent_tokens
        tokens = self.gpu_budget_tokens or math.ceil(self.gpu_budget_fraction * context_tokens)
        top_k = max(tokens, fixed + 1) - fixed
        selected = max(1, math.ceil(self.selected_share * top_k))
        return RequestBudget(self.sink_tokens, self.recent_tokens, top_k, selected, int(self.speculate))


def selects(steps_since_selecting: list[int | None], every: int) -> bool:
    """Whether a batch's step selects (SpeCacheSettings.select_every): each request's steps since its last
    selecting step (None: it has not selected yet: admitted, or its context only now outgrows its budget).
    The batch selects when one of its requests must: one step in `every` of the longest-waiting request, and a
    request's first scored step always (its first token's selection matters most). Every request of the batch
    then selects (one step shape for the batch: one captured graph each way)."""
    if every < 1:
        raise ValueError(f"a step selects every 1 or more steps, not {every}")
    return any(since is None or since + 1 >= every for since in steps_since_selecting)


@dataclass(frozen=True)
class StepSelection:
    """What one decode step reads of a request of `length` positions, from the policy to the SpeCache decoder:
    positions [0, sinks) and [recent_start, length) always, and `top_k` of the candidates [sinks, recent_start)
    per KV head: all of them when they are no more than the budget's top-k (`scored` False: the step reads the
    whole context, as full KV does), else the budget's top-k slots, of which the step selects the `selected`
    best-scored candidates (made resident: those its slots do not hold yet are copied) and reads what the
    others hold (pairs earlier steps selected)."""

    length: int
    sinks: int
    recent_start: int
    top_k: int
    selected: int

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
    """One request's GPU budget in KV pairs per KV head and layer: sinks + recent window + top_k slots, of which a
    step selects `selected` by its scores (None: all top_k), + `scratch` slots (1 with SpeCacheSettings.speculate:
    the speculative token's pair, after the top-k slots)."""

    sink_tokens: int
    recent_tokens: int
    top_k: int
    selected: int | None = None
    scratch: int = 0

    def __post_init__(self) -> None:
        if self.selected is None:
            object.__setattr__(self, "selected", self.top_k)
        if not 1 <= self.selected <= max(self.top_k, 1):
            raise ValueError(f"a step selects 1 to {self.top_k} of the top-k slots, not {self.selected}")

    @property
    def tokens(self) -> int:
        return self.sink_tokens + self.recent_tokens + self.top_k + self.scratch

    @property
    def top_k_slots(self) -> slice:
        """Where the top-k slots lie among the budget's slots."""
        start = self.sink_tokens + self.recent_tokens
        return slice(start, start + self.top_k)

    def select(self, length: int) -> StepSelection:
        """The step's selection for a request whose KV holds `length` positions (the new token's included)."""
        sinks = min(self.sink_tokens, length)
        recent_start = max(sinks, length - self.recent_tokens)
        candidates = recent_start - sinks
        top_k = min(self.top_k, candidates)
        return StepSelection(length, sinks, recent_start, top_k, self.selected if candidates > self.top_k else top_k)


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


@dataclass(frozen=True)
class KVShape:
    """A model's KV geometry, from the model (engine/llama.LlamaFamilyModel) to the policy's byte counts:
    per position, `layers` x `kv_heads` keys and values of `head_dim` elements of `dtype_bytes` bytes."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16

    @property
    def pair_bytes(self) -> int:
        """Bytes of one position's keys and values, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class GpuKVBytes:
    """One SpeCache request's device memory, from `gpu_kv_bytes` to the benchmark's table and the engine's
    accounting, in bytes: `budget` (the full-precision pairs of its sinks, recent window and top-k slots),
    `codes` and `scales` (its low-bit keys and their float16 zero points and steps), `residency` (the table
    of the positions its top-k slots hold); `full` is its full KV on the GPU, the bar's reference."""

    full: int
    budget: int
    codes: int
    scales: int
    residency: int

    @property
    def total(self) -> int:
        return self.budget + self.codes + self.scales + self.residency

    @property
    def smaller(self) -> float:
        """How many times smaller than full KV (the issue's bar: >= 8, goal 10)."""
        return self.full / self.total


def gpu_kv_bytes(settings: SpeCacheSettings, context_tokens: int, shape: KVShape,
                 new_tokens: int = 0) -> GpuKVBytes:
    """The GPU bytes of a request of `context_tokens` prompt tokens that may decode `new_tokens` more, with
    these settings (budget from the prompt, low-bit keys for every position it may reach, in whole groups),
    against its full KV at `shape.dtype_bytes` (bf16 by default). The pool allocation rounds the budget up to
    whole pages (under a page more). ValueError for a context under one token."""
    if context_tokens < 1 or new_tokens < 0:
        raise ValueError(f"a request has at least one prompt token, not {context_tokens} (+{new_tokens} new)")
    budget = settings.budget(context_tokens)
    heads = shape.layers * shape.kv_heads
    positions = context_tokens + new_tokens
    groups = -(-positions // settings.group)
    return GpuKVBytes(full=positions * shape.pair_bytes, budget=budget.tokens * shape.pair_bytes,
                      codes=heads * groups * settings.group * shape.head_dim * settings.bits // 8,
                      scales=heads * groups * shape.head_dim * SCALE_BYTES,
                      residency=heads * budget.top_k * RESIDENCY_BYTES)
