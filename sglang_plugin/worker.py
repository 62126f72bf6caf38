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
A blending request prefilled in full because its chunks were not cached (slower than a full prefill) leaves
them queued: after later passes the plugin computes them into the store, paced to a share of the time
(ChunkBlender.warm_paced, BLENDGATE_SGLANG_WARM_SHARE), so the next such prompt blends.

A request's first tokens may already be in SGLang's pool (`extend_prefix_lens`: a radix-cache match, or the
earlier pieces of a prompt split by chunked prefill). A blending request whose cached prefix lies within its
first segment (the system prompt, which the blend computes exactly) blends; one whose prefix reaches past it
(the radix cache matched chunks another request had in the same order, or the earlier pieces of a split
prompt, computed exactly) blends the chunks after the prefix, its KV read from SGLang's pool as the blend's
exact head. Either way only its tokens past the prefix are written. Blending falls back to exact computation,
per request, with the reason in its report, for a piece of a split prompt before its last, when the prefix
holds all its chunks (nothing left to blend), on bad chunk spans or contexts, or when the blend would be slower
than a full prefill (chunkcache/fallback.py). A batch the plugin cannot take at all
(mixed with decoding or speculative, input logprobs asked, tensor parallelism, an unknown model type, an fp8 KV
pool with a cached prefix to read) runs SGLang's forward unchanged, and its blending requests say why.

Blended KV is approximate, so it must never be shared with later requests as an exact prefix: every request
the plugin blended is kept out of SGLang's radix tree (internals.keep_out_of_radix_cache), while the others
(computed exactly) enter it as usual, so the radix cache stays on for everything else. Only an SGLang that
offers no way to keep a request out of the tree needs --disable-radix-cache for the plugin to blend.

plan.py makes these decisions (plain Python), prefill.py computes each request on blendgate's model, and this
module reads and writes SGLang (through internals.py) and holds the hooks.

The store's sizes, eviction policy, chunk prefix, fallback costs and shared Redis tier (chunkcache/redis_tier.py,
shared with the gateway's local engines and the other workers) come from BLENDGATE_SGLANG_* environment variables
(settings.py: PluginSettings).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from itertools import accumulate

import torch

from ..chunkcache.adaptation import FetchPolicy, decode_rate
from ..chunkcache.codec import Codec
from ..chunkcache.kv_store import ChunkCacheStore
from ..chunkcache.redis_tier import RedisTier
from ..chunkcache.runner import ChunkBlender
from ..chunkcache.selection import DEFAULT_RULE
from ..chunkcache.tiers import MemoryTier, chunk_tensor_bytes
from ..engine.llama import LlamaFamilyModel
from . import internals
from .plan import BatchPlan, RequestPlan, plan_batch, slower_than_full
from .prefill import prefill_pass
from .profile import PROFILE_KEY, TIERS_KEY, PassProfile
from .protocol import REPORT_KEY, fallback_report, wants_chunk_cache
from .settings import PluginSettings

log = logging.getLogger("blendgate.sglang_plugin")

_WORKER_ATTRIBUTE = "blendgate_worker"


@dataclass(frozen=True)
class BatchRequests:
    """What the init_new hook attaches to a forward batch for the forward hook, in batch order: each request's
    custom_params and prompt token ids (plan_batch's input), and SGLang's Req objects (to keep the requests the
    plugin blended out of the radix cache)."""

    params: list[tuple[dict | None, list[int]]]
    reqs: list


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
            link=shared.link) if shared is not None and settings.redis_adapt else None
        # The CPU tier's budget pinned before serving, where each demotion pinned its entry's memory on the
        # scheduler's thread.
        tiers[1].reserve(chunk_tensor_bytes(self.model, settings.cpu_cache_pin_tokens))
        store = ChunkCacheStore(tiers, eviction=settings.eviction, shared=shared, adaptation=adaptation)
        self.blender = ChunkBlender(self.model, store, settings.chunk_prefix,
                                    replace(DEFAULT_RULE, probe_weights=settings.probe_weights),
                                    warm_share=settings.warm_share)
        # The blend-or-full-prefill rule's and the fetch policy's costs, measured on this GPU where needed.
        self.costs = self.blender.calibrate(settings.pass_cost_tokens, settings.placement_cost_tokens)
        self.profile = settings.profile and first.device.type == "cuda"
        log.info("blendgate plugin ready on %s (SGLang %s; chunk-cache: %.1f GB GPU, %.1f GB CPU)",
                 first.device, internals.sglang_version(), settings.gpu_cache_bytes / 2**30,
                 settings.cpu_cache_bytes / 2**30)

    @torch.no_grad()
    def prefill(self, model_runner, forward_batch, requests: list[RequestPlan], entered: float | None = None):
        """Every request of the extend batch prefilled as planned (prefill.py: prefill_pass: the blends' chunks
        found at once, the blends run together, the others one by one), in one pass: each request's new KV
        written into SGLang's pool at its `out_cache_loc` slots, its last hidden state through SGLang's logits
        processor, in batch order. Returns SGLang's LogitsProcessorOutput, with each request's report (None for
        those that asked no blend). With profiling on (settings.profile), each report also carries the pass's
        PassTimings (profile.py) under PROFILE_KEY and the chunk-cache's tiers after it under TIERS_KEY;
        `entered`: perf_counter() at the forward hook's entry (default: now)."""
        profile = PassProfile(entered if entered is not None else time.perf_counter()) if self.profile else None
        loc, tokens = forward_batch.out_cache_loc, forward_batch.input_ids
        offsets = [0, *accumulate(request.extend_len for request in requests)]
        readers = []
        for index, request in enumerate(requests):
            read_prefix = None
            if request.prefix_len and (request.prompt is None or request.exact_head):
                slots = internals.prefix_slots(model_runner, forward_batch, index, request.prefix_len)
                read_prefix = partial(internals.read_layer_kv, model_runner, loc=slots)
            readers.append(read_prefix)
        done = prefill_pass(self.blender, requests,
                            [tokens[offsets[i]:offsets[i + 1]] for i in range(len(requests))], readers,
                            profile.mark if profile is not None else None)
        for index, prefilled in enumerate(done):
            keys, values = prefilled.new_kv_layers()
            for layer in range(self.model.num_layers):
                internals.write_layer_kv(model_runner, layer, loc[offsets[index]:offsets[index + 1]], keys[layer],
                                         values[layer])
            del keys, values
        if profile is not None:
            profile.mark("kv_write")
        logits_output = internals.logits_from_hidden(model_runner, forward_batch,
                                                     torch.stack([p.last_hidden for p in done]))
        reports = [p.report for p in done]
        if profile is not None:
            profile.mark("logits")
            timings = profile.finish(len(done)).as_dict()
            tiers = [{name: tier[name] for name in ("name", "entries", "bytes", "budget_bytes")}
                     for tier in self.blender.store.report()["tiers"]]
            reports = [None if report is None else {**report, PROFILE_KEY: timings, TIERS_KEY: tiers}
                       for report in reports]
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
            setattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE,
                    BatchRequests(requests, internals.reqs_of(schedule_batch)))
    return forward_batch


def around_forward_raw(original, model_runner, forward_batch, *args, **kwargs):
    """ModelRunner._forward_raw: the plugin's prefill for a batch in which some request blends, SGLang's for
    any other."""
    entered = time.perf_counter()
    batch = getattr(forward_batch, internals.BATCH_PARAMS_ATTRIBUTE, None)
    if batch is None:
        output = original(model_runner, forward_batch, *args, **kwargs)
        _warm_after(model_runner)
        return output
    try:
        plain_extend = internals.is_plain_extend(forward_batch)
        # Speculative and split passes are extends too, but may lack the per-request extend lengths.
        extend_lens, prefix_lens, logprob_starts = internals.extend_layout(forward_batch) if plain_extend else \
            ([], [], None)
        shares = internals.radix_cache_enabled(model_runner) and \
            not all(internals.can_keep_out_of_radix_cache(req) for req in batch.reqs)
        config = internals.hf_config(model_runner)
        plan = plan_batch(batch.params, extend_lens, prefix_lens, logprob_starts, plain_extend=plain_extend,
                          single_device=internals.single_device(model_runner), shares_blended_kv=shares,
                          pool_readable=not any(prefix_lens) or internals.pool_holds_model_dtype(model_runner),
                          model_type=config.model_type, vocab_size=config.vocab_size)
    except Exception:  # an SGLang we do not know: serve the batch as SGLang would, never fail it
        log.exception("blendgate plugin could not read this batch; SGLang prefills it")
        return original(model_runner, forward_batch, *args, **kwargs)
    worker = _worker(model_runner) if plan.requests is not None else None
    if plan.requests is not None and worker is None:
        plan = _failed(plan, "the plugin could not start (see the log)")
    elif worker is not None:
        try:
            plan = slower_than_full(plan, lambda prompt, head: worker.blender.weigh(prompt, worker.costs, head))
            if plan.requests is not None:
                logits_output = worker.prefill(model_runner, forward_batch, plan.requests, entered)
                for req, request in zip(batch.reqs, plan.requests):
                    if request.prompt is not None:  # approximate KV: never an exact prefix for later requests
                        internals.keep_out_of_radix_cache(req)
                return internals.runner_output(logits_output)
        except Exception as exc:  # e.g. out of memory: SGLang's own prefill overwrites whatever was written
            log.exception("blendgate plugin failed to blend; prefilling in full")
            if plan.requests is not None:
                plan = _failed(plan, f"blending failed: {exc}")
    output = original(model_runner, forward_batch, *args, **kwargs)
    if any(report is not None for report in plan.reports):
        internals.set_report(output.logits_output, REPORT_KEY, plan.reports)
    _warm_after(model_runner)
    return output


@torch.no_grad()
def _warm_after(model_runner) -> None:
    """After a pass SGLang ran (a decode step, or a prefill in full): one chunk a full-prefill fallback left
    uncached, computed into the store when the pacer says one is due (ChunkBlender.warm_paced: at most
    BLENDGATE_SGLANG_WARM_SHARE of the time), so that the prompts that fell back blend next time. A pass here
    always has requests behind it, so warming is always paced; a failure is logged."""
    worker = getattr(model_runner, _WORKER_ATTRIBUTE, None)
    if not worker or not worker.blender.pending_warm:
        return
    try:
        worker.blender.warm_paced(busy=True)
    except Exception:
        log.exception("blendgate plugin could not compute a chunk's KV for its store")


def _failed(plan: BatchPlan, reason: str) -> BatchPlan:
    """SGLang's forward for a batch the plugin meant to prefill but could not: every request that asked to blend
    says why."""
    return BatchPlan(None, [fallback_report(request.prompt.mode, reason) if request.prompt is not None
                            else request.report for request in plan.requests])
