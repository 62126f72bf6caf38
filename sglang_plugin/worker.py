"""Blending inside an SGLang worker: which forward passes the plugin takes over, and how.

An extend batch in which at least one request asks for "blend" or "reuse" (chunk spans in custom_params, see
protocol.py) is prefilled by blendgate's own code on SGLang's weights (shared, not copied), every request of it
in one pass of the plugin's:
- a request that blends: each chunk's KV from the chunk-cache store under the same keys as the local engine,
  CacheBlend with blendgate's kernels in a private cache;
- any other request (it asked for no blend, or its blend falls back: see below): computed exactly
  (LlamaFamilyModel.forward), after the KV of its cached prefix gathered from SGLang's pool;
then each request's new KV is written into SGLang's pool at its slots (`out_cache_loc`) and each request's last
hidden state handed to SGLang's logits processor, in batch order. Decoding is SGLang's own, over that pool.

A request's first tokens may already be in SGLang's pool (`extend_prefix_lens`: a radix-cache match, or the
earlier pieces of a prompt split by chunked prefill). A blending request whose cached prefix lies within its
first segment (the system prompt, which the blend computes exactly) blends, and only its tokens past the prefix
are written. Blending falls back to exact computation, per request, with the reason in its report, when the
prompt is a piece of a split prompt (the blend needs the whole prompt in one pass), when the radix cache holds
tokens past its first segment (exact KV of its chunks: better than a blend), on bad chunk spans, or when the
blend would be slower than a full prefill (chunkcache/fallback.py). A batch the plugin cannot take at all
(mixed with decoding or speculative, input logprobs asked, tensor parallelism, an unknown model type, an fp8 KV
pool with a cached prefix to read) runs SGLang's forward unchanged, and its blending requests say why.

Blended KV is approximate, so it must never be shared with later requests as an exact prefix: every request
the plugin blended is kept out of SGLang's radix tree (internals.keep_out_of_radix_cache), while the others
(computed exactly) enter it as usual, so the radix cache stays on for everything else. Only an SGLang that
offers no way to keep a request out of the tree needs --disable-radix-cache for the plugin to blend.

The store's sizes, eviction policy, chunk prefix, fallback costs and shared Redis tier (chunkcache/redis_tier.py,
shared with the gateway's local engines and the other workers) come from BLENDGATE_SGLANG_* environment variables
(settings.py: PluginSettings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..chunkcache.adaptation import FetchPolicy, decode_rate
from ..chunkcache.codec import Codec
from ..chunkcache.kv_store import ChunkCacheStore
from ..chunkcache.redis_tier import RedisTier
from ..chunkcache.runner import ChunkBlender
from ..chunkcache.tiers import MemoryTier
from ..engine.llama import SUPPORTED_MODEL_TYPES, KVCache, LlamaFamilyModel
from ..engine.prompt import Prompt
from . import internals
from .protocol import PREFILL_MODE, REPORT_KEY, fallback_report, prompt_of, wants_chunk_cache
from .settings import PluginSettings

log = logging.getLogger("blendgate.sglang_plugin")

BLEND_MODES = ("blend", "reuse")
_WORKER_ATTRIBUTE = "blendgate_worker"


@dataclass(frozen=True)
class BatchRequests:
    """What the init_new hook attaches to a forward batch for the forward hook, in batch order: each request's
    custom_params and prompt token ids (plan_batch's input), and SGLang's Req objects (to keep the requests the
    plugin blended out of the radix cache)."""

    params: list[tuple[dict | None, list[int]]]
    reqs: list


@dataclass(frozen=True)
class RequestPlan:
    """How the plugin prefills one request of an extend batch (plan_batch to BlendWorker.prefill). Lengths in
    tokens: `prefix_len` already in SGLang's pool, `extend_len` computed in this pass."""

    prefix_len: int
    extend_len: int
    prompt: Prompt | None = None  # blended; None: computed exactly after the cached prefix
    report: dict | None = None  # for a request computed exactly: its fallback report, or None: it asked no blend


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
               shares_blended_kv: bool, pool_readable: bool, model_type: str) -> BatchPlan:
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
    plans = [_request_plan(custom, ids, extend, prefix) if want else RequestPlan(prefix, extend)
             for want, (custom, ids), extend, prefix in zip(wanted, requests, extend_lens, prefix_lens)]
    return BatchPlan(plans, []) if any(plan.prompt is not None for plan in plans) else BatchPlan.sglangs(plans)


def _request_plan(custom: dict, ids: list[int], extend: int, prefix: int) -> RequestPlan:
    """A blending request's plan: its blend, or an exact prefill with the reason it cannot blend."""
    mode = custom.get(PREFILL_MODE)

    def exact(reason: str) -> RequestPlan:
        return RequestPlan(prefix, extend, report=fallback_report(mode, reason))

    try:
        prompt = prompt_of(ids, custom)
    except ValueError as exc:
        return exact(f"bad chunk spans: {exc}")
    if prompt.segments[-1].is_chunk:
        return exact("the prompt ends inside a chunk (blending needs computed tokens after the last chunk)")
    if prefix + extend != len(ids):
        return exact("the prompt was split by chunked prefill (the blend needs the whole prompt in one pass): "
                     "computed in full")
    first = prompt.segments[0]
    exact_head = len(first.token_ids) if not first.is_chunk and len(prompt.segments) > 1 else 0
    if prefix > exact_head:
        return exact(f"the prompt's first {prefix} tokens were in SGLang's KV pool already (a radix-cache match, "
                     "or the earlier pieces of a prompt split by chunked prefill), past its first segment: the "
                     "rest computed exactly after them")
    return RequestPlan(prefix, extend, prompt)


def slower_than_full(plan: BatchPlan, fallback: Callable[[Prompt], str | None]) -> BatchPlan:
    """The plan with each request whose blend would be slower than a full prefill (`fallback`:
    ChunkBlender.fallback with the worker's costs) computed exactly instead, with the reason in its report; the
    others still blend. SGLang's forward when none blends any more."""
    plans = []
    for request in plan.requests:
        reason = fallback(request.prompt) if request.prompt is not None else None
        plans.append(RequestPlan(request.prefix_len, request.extend_len,
                                 report=fallback_report(request.prompt.mode, reason)) if reason else request)
    return BatchPlan(plans, []) if any(p.prompt is not None for p in plans) else BatchPlan.sglangs(plans)


class BlendWorker:
    """The plugin's state in one SGLang model runner: blendgate's view of SGLang's weights and the store."""

    def __init__(self, model_runner, settings: PluginSettings) -> None:
        tensors = internals.checkpoint_tensors(model_runner)
        first = tensors["model.embed_tokens.weight"]
        self.model = LlamaFamilyModel(internals.hf_config(model_runner), tensors, device=first.device,
                                      dtype=first.dtype)
        tiers = [MemoryTier("gpu", settings.gpu_cache_bytes, first.device),
                 MemoryTier("cpu", settings.cpu_cache_bytes, "cpu")]
        shared = RedisTier(settings.redis_url, settings.redis_budget_bytes, key_prefix=settings.redis_key_prefix,
                           timeout_s=settings.redis_timeout_s, codec=Codec(settings.codec, settings.codec_level),
                           device=first.device) if settings.redis_url else None
        adaptation = FetchPolicy(
            decode_rate(settings.codec, settings.codec_level, on_gpu=shared.decode_device.type == "cuda"),
            settings.costs, link=shared.link) if shared is not None and settings.redis_adapt else None
        store = ChunkCacheStore(tiers, eviction=settings.eviction, shared=shared, adaptation=adaptation)
        self.blender = ChunkBlender(self.model, store, settings.chunk_prefix)
        self.costs = settings.costs
        log.info("blendgate plugin ready on %s (SGLang %s; chunk-cache: %.1f GB GPU, %.1f GB CPU)",
                 first.device, internals.sglang_version(), settings.gpu_cache_bytes / 2**30,
                 settings.cpu_cache_bytes / 2**30)

    @torch.no_grad()
    def prefill(self, model_runner, forward_batch, requests: list[RequestPlan]):
        """Every request of the extend batch prefilled as planned, in one pass: its new KV written into SGLang's
        pool at its `out_cache_loc` slots, its last hidden state through SGLang's logits processor. Returns
        SGLang's LogitsProcessorOutput, with each request's report (None for those that asked no blend)."""
        loc, tokens = forward_batch.out_cache_loc, forward_batch.input_ids
        hidden, reports, offset = [], [], 0
        for index, request in enumerate(requests):
            end = offset + request.extend_len
            if request.prompt is not None:
                result, report = self.blender.blend(request.prompt, logits=False)
                cache, last = result.cache, result.hidden
                reports.append(report.as_dict())  # the wire form (protocol.py)
            else:
                cache = self._cached_prefix(model_runner, forward_batch, index, request)
                last = self.model.forward(tokens[offset:end].long(), None, cache, logits=False)[0]
                reports.append(request.report)
            self._write_kv(model_runner, cache, request.prefix_len, loc[offset:end])
            hidden.append(last)
            offset = end
        logits_output = internals.logits_from_hidden(model_runner, forward_batch, torch.stack(hidden))
        internals.set_report(logits_output, REPORT_KEY, reports)
        return logits_output

    def _cached_prefix(self, model_runner, forward_batch, index: int, request: RequestPlan) -> KVCache:
        """A private cache for the request, holding the KV of its cached prefix read from SGLang's pool."""
        cache = self.model.new_cache(request.prefix_len + request.extend_len)
        if request.prefix_len:
            slots = internals.prefix_slots(model_runner, forward_batch, index, request.prefix_len)
            for layer in range(self.model.num_layers):
                keys, values = internals.read_layer_kv(model_runner, layer, slots)
                cache.keys[layer, :, :request.prefix_len] = keys.transpose(0, 1)
                cache.values[layer, :, :request.prefix_len] = values.transpose(0, 1)
            cache.positions[:request.prefix_len] = torch.arange(request.prefix_len, device=cache.positions.device)
            cache.length = request.prefix_len
        return cache

    def _write_kv(self, model_runner, cache: KVCache, start: int, slots) -> None:
        """The cache's KV from position `start` on (one per slot) into SGLang's pool at `slots`."""
        end = start + slots.shape[0]
        for layer in range(self.model.num_layers):
            # Ours are [kv_heads, slots, head_dim]; SGLang's pool takes [tokens, kv_heads, head_dim].
            internals.write_layer_kv(model_runner, layer, slots,
                                     cache.keys[layer, :, start:end].transpose(0, 1).contiguous(),
                                     cache.values[layer, :, start:end].transpose(0, 1).contiguous())


def _worker(model_runner) -> BlendWorker | None:
    worker = getattr(model_runner, _WORKER_ATTRIBUTE, False)
    if worker is False:
        try:
            worker = BlendWorker(model_runner, PluginSettings.from_env())
        except Exception:  # the worker keeps serving, without blending
            log.exception("blendgate plugin could not start; requests are prefilled in full")
            worker = None
        setattr(model_runner, _WORKER_ATTRIBUTE, worker)
    return worker


# -- the hooks (registered in __init__.register) ---------------------------------------------------------
def around_init_new(original, *args, **kwargs):
    """ForwardBatch.init_new(batch, model_runner): remembers the requests' chunk spans on the forward batch."""
    forward_batch = original(*args, **kwargs)
    schedule_batch = kwargs.get("batch", args[1] if len(args) > 1 else None)
    if schedule_batch is not None and internals.is_extend_batch(schedule_batch):
        requests = internals.requests_of(schedule_batch)
        if any(wants_chunk_cache(custom) for custom, _ in requests):
            setattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE,
                    BatchRequests(requests, internals.reqs_of(schedule_batch)))
    return forward_batch


def around_forward_raw(original, model_runner, forward_batch, *args, **kwargs):
    """ModelRunner._forward_raw: the plugin's prefill for a batch in which some request blends, SGLang's for
    any other."""
    batch = getattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE, None)
    if batch is None:
        return original(model_runner, forward_batch, *args, **kwargs)
    try:
        plain_extend = internals.is_plain_extend(forward_batch)
        # Speculative and split passes are extends too, but may lack the per-request extend lengths.
        extend_lens, prefix_lens, logprob_starts = internals.extend_layout(forward_batch) if plain_extend else \
            ([], [], None)
        shares = internals.radix_cache_enabled(model_runner) and \
            not all(internals.can_keep_out_of_radix_cache(req) for req in batch.reqs)
        plan = plan_batch(batch.params, extend_lens, prefix_lens, logprob_starts, plain_extend=plain_extend,
                          single_device=internals.single_device(model_runner), shares_blended_kv=shares,
                          pool_readable=not any(prefix_lens) or internals.pool_holds_model_dtype(model_runner),
                          model_type=internals.hf_config(model_runner).model_type)
    except Exception:  # an SGLang we do not know: serve the batch as SGLang would, never fail it
        log.exception("blendgate plugin could not read this batch; SGLang prefills it")
        return original(model_runner, forward_batch, *args, **kwargs)
    worker = _worker(model_runner) if plan.requests is not None else None
    if worker is not None:
        plan = slower_than_full(plan, lambda prompt: worker.blender.fallback(prompt, worker.costs))
    if worker is not None and plan.requests is not None:
        try:
            logits_output = worker.prefill(model_runner, forward_batch, plan.requests)
        except Exception as exc:  # e.g. out of memory: SGLang's own prefill overwrites whatever was written
            log.exception("blendgate plugin failed to blend; prefilling in full")
            plan = _failed(plan, f"blending failed: {exc}")
        else:
            for req, request in zip(batch.reqs, plan.requests):
                if request.prompt is not None:  # approximate KV: never an exact prefix for later requests
                    internals.keep_out_of_radix_cache(req)
            return internals.runner_output(logits_output)
    elif plan.requests is not None:
        plan = _failed(plan, "the plugin could not start (see the log)")
    output = original(model_runner, forward_batch, *args, **kwargs)
    if any(report is not None for report in plan.reports):
        internals.set_report(output.logits_output, REPORT_KEY, plan.reports)
    return output


def _failed(plan: BatchPlan, reason: str) -> BatchPlan:
    """SGLang's forward for a batch the plugin meant to prefill but could not: every request that asked to blend
    says why."""
    return BatchPlan(None, [fallback_report(request.prompt.mode, reason) if request.prompt is not None
                            else request.report for request in plan.requests])
