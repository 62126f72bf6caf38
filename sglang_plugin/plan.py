"""Which extend batches blendgate's plugin prefills, and how each request of one (plain Python, tested on the CPU).

plan_batch reads what SGLang's forward batch says of each request (its custom_params and prompt ids, the tokens
computed in this pass and those already in SGLang's KV pool) and answers with a BatchPlan: SGLang's forward for
the whole batch (with why each request that asked to blend did not), or the plugin's pass, one RequestPlan per
request: blend it, or compute it exactly after its cached prefix. slower_than_full turns the blends that would
be slower than a full prefill into exact prefills. worker.py's module docstring says when and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

from ..chunkcache.fallback import FallbackDecision
from ..engine.llama import SUPPORTED_MODEL_TYPES
from ..engine.prompt import Prompt
from .protocol import PREFILL_MODE, fallback_report, prompt_of, wants_chunk_cache

BLEND_MODES = ("blend", "reuse")


@dataclass(frozen=True)
class RequestPlan:
    """How the plugin prefills one request of an extend batch (plan_batch to BlendWorker.prefill). Lengths in
    tokens: `prefix_len` already in SGLang's pool, `extend_len` computed in this pass."""

    prefix_len: int
    extend_len: int
    prompt: Prompt | None = None  # blended; None: computed exactly after the cached prefix
    report: dict | None = None  # for a request computed exactly: its fallback report, or None: it asked no blend
    # A blended request whose cached prefix reaches past its first segment (a radix-cache match over its system
    # prompt and first chunks): the blend reuses that prefix's KV from SGLang's pool as its exact head
    # (prefill.py). False: the blend computes its first segment itself (a prefix within it, or none).
    exact_head: bool = False


@dataclass(frozen=True)
class BatchPlan:
    """plan_batch's answer to the forward hook: the plugin prefills the batch (`requests`, one per request), or
    SGLang does (`requests` None; `reports`: per request, why one that asked to blend did not, else None)."""

    requests: list[RequestPlan] | None
    reports: list[dict | None]

    @classmethod
    def sglangs(cls, plans: list[RequestPlan]) -> "BatchPlan":
        """SGLang's forward for a batch in which no request blends, each one's report kept."""
        return cls(None, [plan.report for plan in plans])


def plan_batch(requests: list[tuple[dict | None, list[int]]], extend_lens: list[int], prefix_lens: list[int],
               logprob_starts: list[int] | None, *, plain_extend: bool, single_device: bool,
               shares_blended_kv: bool, pool_readable: bool, model_type: str,
               vocab_size: int | None = None) -> BatchPlan:
    """Whether the plugin prefills this extend batch (some request blends) or SGLang does, and how each request
    is prefilled. `requests`: (custom_params, prompt token ids) each; per request, `extend_lens` tokens computed
    in this pass after `prefix_lens` already in the pool, and where input logprobs start (None: none asked).
    `shares_blended_kv`: the radix cache is on and this SGLang cannot keep a request out of it;
    `pool_readable`: the KV pool holds the model's dtype (a cached prefix can be read from it)."""
    wanted = [wants_chunk_cache(custom) and custom.get(PREFILL_MODE) in BLEND_MODES for custom, _ in requests]
    if not any(wanted):
        return BatchPlan(None, [None] * len(requests))
    reason = None
    if not plain_extend:
        reason = "not a plain prefill pass (mixed with decoding, or speculative)"
    elif not single_device:
        reason = "tensor or pipeline parallelism (the plugin blends on one GPU)"
    elif shares_blended_kv:
        reason = "the radix cache is on and this SGLang cannot keep blended KV out of it: start SGLang with " \
                 "--disable-radix-cache to blend"
    elif model_type not in SUPPORTED_MODEL_TYPES:
        reason = f"model type {model_type!r} is not one blendgate blends"
    elif logprob_starts is not None and any(start < extend - 1 for start, extend in zip(logprob_starts, extend_lens)):
        reason = "input logprobs were asked for"
    elif not pool_readable and any(prefix_lens):
        reason = "the KV pool's dtype is not the model's (fp8 KV cache): a cached prefix cannot be read from it"
    if reason:
        return BatchPlan(None, [fallback_report(custom.get(PREFILL_MODE), reason) if want else None
                                for want, (custom, _) in zip(wanted, requests)])
    plans = [_request_plan(custom, ids, extend, prefix, vocab_size) if want else RequestPlan(prefix, extend)
             for want, (custom, ids), extend, prefix in zip(wanted, requests, extend_lens, prefix_lens)]
    return BatchPlan(plans, []) if any(plan.prompt is not None for plan in plans) else BatchPlan.sglangs(plans)


def _request_plan(custom: dict, ids: list[int], extend: int, prefix: int, vocab_size: int | None) -> RequestPlan:
    """A blending request's plan: its blend, or an exact prefill with the reason it cannot blend."""
    mode = custom.get(PREFILL_MODE)

    def exact(reason: str) -> RequestPlan:
        return RequestPlan(prefix, extend, report=fallback_report(mode, reason))

    try:
        prompt = prompt_of(ids, custom, vocab_size)
    except ValueError as exc:
        return exact(f"bad chunk spans or contexts: {exc}")
    if prompt.segments[-1].is_chunk:
        return exact("the prompt ends inside a chunk (blending needs computed tokens after the last chunk)")
    if prefix + extend != len(ids):
        return exact("a piece of a prompt split by chunked prefill, before its last (the pieces before the last "
                     "are computed exactly; the last blends the chunks after them)")
    first = prompt.segments[0]
    first_segment = len(first.token_ids) if not first.is_chunk and len(prompt.segments) > 1 else 0
    if prefix <= first_segment:
        return RequestPlan(prefix, extend, prompt)
    # The pool holds its system prompt and more (SGLang's radix cache matched chunks another request had in the
    # same order): that KV is exact, so the blend starts from it and blends the chunks after it.
    ends = accumulate(len(segment.token_ids) for segment in prompt.segments)
    if not any(segment.is_chunk and end - len(segment.token_ids) >= prefix
               for segment, end in zip(prompt.segments, ends)):
        return exact(f"the prompt's first {prefix} tokens, all its chunks among them, were in SGLang's KV pool "
                     "already (a radix-cache match): the rest computed exactly after them")
    return RequestPlan(prefix, extend, prompt, exact_head=True)


def slower_than_full(plan: BatchPlan, weigh: Callable[[Prompt, int], FallbackDecision]) -> BatchPlan:
    """The plan with each request whose blend would be slower than a full prefill (`weigh`(prompt, exact head's
    tokens): ChunkBlender.weigh with the worker's costs) computed exactly instead, with the reason and which of its
    chunks the store held in its report; the others still blend. SGLang's forward when none blends any more."""
    plans = []
    for request in plan.requests:
        head = request.prefix_len if request.exact_head else 0
        decision = weigh(request.prompt, head) if request.prompt is not None else None
        plans.append(RequestPlan(request.prefix_len, request.extend_len,
                                 report=fallback_report(request.prompt.mode, decision.reason, decision.hits))
                     if decision is not None and decision.reason else request)
    return BatchPlan(plans, []) if any(p.prompt is not None for p in plans) else BatchPlan.sglangs(plans)
