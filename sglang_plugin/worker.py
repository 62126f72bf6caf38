"""Blending inside an SGLang worker: which forward passes the plugin takes over, and how.

An extend batch whose requests all ask for "blend" or "reuse" (chunk spans in custom_params, see protocol.py)
is prefilled by blendgate's own code on SGLang's weights (shared, not copied): each chunk's KV from the
chunk-cache store under the same keys as the local engine, CacheBlend with blendgate's kernels in a private
cache, then every layer's KV written into SGLang's pool at the request's slots (`out_cache_loc`), and each
request's last hidden state handed to SGLang's logits processor. Decoding is SGLang's own, over that pool.

Anything else runs SGLang's forward unchanged. A request that asked to blend but could not (batched with
requests that do not blend, a prompt split by chunked prefill or found in the radix cache, input logprobs
asked, tensor parallelism, or a batch where blending a request would be slower than a full prefill:
chunkcache/fallback.py) is prefilled in full and its report says why.

Blended KV is approximate, so it must never be shared with later requests as an exact prefix: the plugin only
blends when SGLang runs with --disable-radix-cache (the chunk-cache replaces it for chunks).

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
from ..engine.llama import SUPPORTED_MODEL_TYPES, LlamaFamilyModel
from ..engine.prompt import Prompt
from . import internals
from .protocol import PREFILL_MODE, REPORT_KEY, fallback_report, prompt_of, wants_chunk_cache
from .settings import PluginSettings

log = logging.getLogger("blendgate.sglang_plugin")

BLEND_MODES = ("blend", "reuse")
_WORKER_ATTRIBUTE = "blendgate_worker"


@dataclass
class BatchPlan:
    prompts: list[Prompt] | None  # the plugin prefills these (one per request), or None: SGLang's forward
    # Per request, for a batch left to SGLang: why a request did not blend (PrefillReport's wire form).
    reports: list[dict | None]


def plan_batch(requests: list[tuple[dict | None, list[int]]], extend_lens: list[int], prefix_lens: list[int],
               logprob_starts: list[int] | None, *, plain_extend: bool, single_device: bool,
               radix_cache: bool, model_type: str) -> BatchPlan:
    """Whether the plugin prefills this extend batch (every request blends) or SGLang does (any other)."""
    wanted = [wants_chunk_cache(custom) and custom.get(PREFILL_MODE) in BLEND_MODES for custom, _ in requests]
    if not any(wanted):
        return BatchPlan(None, [None] * len(requests))
    reason, prompts = None, []
    if not plain_extend:
        reason = "not a plain prefill pass (mixed with decoding, or speculative)"
    elif not single_device:
        reason = "tensor or pipeline parallelism (the plugin blends on one GPU)"
    elif radix_cache:
        reason = "the radix cache is on: start SGLang with --disable-radix-cache to blend"
    elif model_type not in SUPPORTED_MODEL_TYPES:
        reason = f"model type {model_type!r} is not one blendgate blends"
    elif not all(wanted):
        reason = "batched with requests that do not blend"
    elif any(prefix for prefix in prefix_lens) or \
            any(extend != len(ids) for extend, (_, ids) in zip(extend_lens, requests)):
        reason = "the prompt was split (chunked prefill) or partly found in the radix cache"
    elif logprob_starts is not None and any(start < extend - 1 for start, extend in zip(logprob_starts, extend_lens)):
        reason = "input logprobs were asked for"
    else:
        try:
            prompts = [prompt_of(ids, custom) for custom, ids in requests]
        except ValueError as exc:
            reason = f"bad chunk spans: {exc}"
        if not reason and any(p.segments[-1].is_chunk for p in prompts):
            reason = "the prompt ends inside a chunk (blending needs computed tokens after the last chunk)"
    if reason:
        reports = [fallback_report(custom.get(PREFILL_MODE), reason) if want else None
                   for want, (custom, _) in zip(wanted, requests)]
        return BatchPlan(None, reports)
    return BatchPlan(prompts, [])


def slower_than_full(prompts: list[Prompt], fallback: Callable[[Prompt], str | None]) -> BatchPlan | None:
    """A full-prefill plan when blending any request of the batch would be slower than a full prefill
    (`fallback`: ChunkBlender.fallback with the worker's costs), else None. The batch is prefilled as one, so
    either every request blends or none does."""
    reasons = [fallback(prompt) for prompt in prompts]
    if not any(reasons):
        return None
    return BatchPlan(None, [fallback_report(prompt.mode, reason or "batched with a request that blending would "
                                                                   "slow down")
                            for prompt, reason in zip(prompts, reasons)])


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
    def prefill(self, model_runner, forward_batch, prompts: list[Prompt]):
        loc = forward_batch.out_cache_loc
        hidden, reports, offset = [], [], 0
        for prompt in prompts:
            result, report = self.blender.blend(prompt, logits=False)
            count = len(prompt)
            slots = loc[offset:offset + count]
            cache = result.cache
            for layer in range(self.model.num_layers):
                # Ours are [kv_heads, slots, head_dim]; SGLang's pool takes [tokens, kv_heads, head_dim].
                internals.write_layer_kv(model_runner, layer, slots,
                                         cache.keys[layer, :, :count].transpose(0, 1).contiguous(),
                                         cache.values[layer, :, :count].transpose(0, 1).contiguous())
            hidden.append(result.hidden)
            reports.append(report.as_dict())  # the wire form (protocol.py)
            offset += count
        logits_output = internals.logits_from_hidden(model_runner, forward_batch, torch.stack(hidden))
        internals.set_report(logits_output, REPORT_KEY, reports)
        return logits_output


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
            setattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE, requests)
    return forward_batch


def around_forward_raw(original, model_runner, forward_batch, *args, **kwargs):
    """ModelRunner._forward_raw: the plugin's prefill for a batch that blends, SGLang's for any other."""
    requests = getattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE, None)
    if requests is None:
        return original(model_runner, forward_batch, *args, **kwargs)
    try:
        plain_extend = internals.is_plain_extend(forward_batch)
        # Speculative and split passes are extends too, but may lack the per-request extend lengths.
        extend_lens, prefix_lens, logprob_starts = internals.extend_layout(forward_batch) if plain_extend else \
            ([], [], None)
        plan = plan_batch(requests, extend_lens, prefix_lens, logprob_starts, plain_extend=plain_extend,
                          single_device=internals.single_device(model_runner),
                          radix_cache=internals.radix_cache_enabled(model_runner),
                          model_type=internals.hf_config(model_runner).model_type)
    except Exception:  # an SGLang we do not know: serve the batch as SGLang would, never fail it
        log.exception("blendgate plugin could not read this batch; SGLang prefills it")
        return original(model_runner, forward_batch, *args, **kwargs)
    worker = _worker(model_runner) if plan.prompts is not None else None
    if worker is not None:
        slower = slower_than_full(plan.prompts, lambda prompt: worker.blender.fallback(prompt, worker.costs))
        if slower is not None:
            plan = slower
        else:
            try:
                return internals.runner_output(worker.prefill(model_runner, forward_batch, plan.prompts))
            except Exception as exc:  # e.g. out of memory: SGLang's own prefill overwrites whatever was written
                log.exception("blendgate plugin failed to blend; prefilling in full")
                plan = BatchPlan(None, [{"mode": "full_prefill", "fallback": f"blending failed: {exc}"}
                                        for _ in requests])
    elif plan.prompts is not None:
        plan = BatchPlan(None, [{"mode": "full_prefill", "fallback": "the plugin could not start (see the log)"}
                                for _ in requests])
    output = original(model_runner, forward_batch, *args, **kwargs)
    if any(report is not None for report in plan.reports):
        internals.set_report(output.logits_output, REPORT_KEY, plan.reports)
    return output
