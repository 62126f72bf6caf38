"""The local engine's runner with chunk-caches: prefills prompts in the mode they ask for.

- full_prefill: every token computed (the quality reference);
- prefix: the KV of an exact shared prefix is reused (the prompt's first segment, and that segment plus
  the first chunk, are kept in a small LRU), the rest computed;
- reuse: every chunk's cached KV used as is (CacheBlend with recompute ratio 0);
- blend: cached chunk KV with the most deviating tokens recomputed (CacheBlend).

Chunk KV is computed on first use and kept in the chunk-cache store under the model's fingerprint: after
the prompt's first segment (chunk_prefix "system": system prompt and "Documents:" header, the default) and the
prompt's chunk_context, or alone (chunk_prefix "none"). bench/quality.py measures both. A chunk segment with a
context of its own (PromptSegment.context: e.g. the text before it in its source document) is computed after
the first segment and that context instead, and kept under that prefix (ChunkKey holds the prefix's digest, so
KV computed in different contexts never mixes): chunk KV computed in a context like the one it is reused in, as
Cache-Craft (arXiv 2502.15734) reuses KV from earlier contexts and Anthropic's "contextual retrieval" prepends
a chunk's document context to it.

A blend is never chosen when it would be slower than a full prefill (fallback.py: blend_fallback): the chunks
not cached yet cost a forward pass (one for all those computed after the same prefix: chunk_kvs), each cached
one a placement, which small chunks may not earn back; such prompts are prefilled in full and the report says
why ("fallback").

With a shared tier, each chunk no local tier holds is fetched from it, or, when the store has a fetch policy
(adaptation.py) that finds the link too slow for the entry's size, recomputed from its tokens; the report says
which and why per chunk (`shared_fetch`). Each chunk precomputed is timed into the policy's prefill rate.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from cachetools import LRUCache

from ..engine.llama import KVCache, LlamaFamilyModel
from ..engine.prefill_report import PrefillReport
from ..engine.prompt import CHUNK_PREFIXES, Prompt, PromptSegment
from ..engine.runner import KVState, LlamaRunner
from ..engine.weights import LoadedModel
from . import defaults
from .blend import (
    BATCH_CHUNK_TOKENS,
    BlendJob,
    BlendResult,
    blend_prefill,
    blend_prefill_batch,
    precompute_chunk,
    precompute_chunks,
)
from .fallback import (
    DEFAULT_PASS_COST_TOKENS,
    FallbackDecision,
    PrefillCalibration,
    PrefillCosts,
    PrefillTiming,
    blend_fallback,
)
from .keys import ChunkKey, model_fingerprint, token_digest
from .kv import ChunkKV, ExactHead
from .kv_store import ChunkCacheStore, ChunkSource
from .selection import DEFAULT_RULE, SelectionRule
from .warming import DEFAULT_WARM_SHARE, WarmPacer, WarmQueue

# The chunk sizes the prefill's costs are measured at (ChunkBlender.measure_prefill), and the timed passes each.
# On a GPU the larger size is a whole RAG prompt's, 4,096 tokens (at most the model's context): below that an 8B
# model's pass is still mostly fixed cost, so the fit's slope is a small difference of two noisy times and the
# intercept over it (the pass cost in tokens) swings with the noise. At 256 tokens six replicas of one H200 run
# measured 24k to 357k tokens/s for Llama-3-8B's shapes (bench/results/fetch-ttft-2026-12-01.md run 4); at 1,024
# inside SGLang's process one start-up measured a pass at ~2,150 tokens and another above the 3,482 a prompt of
# 8 x 512 saves at r = 0.15, so that worker prefilled every prompt with an uncached chunk in full
# (bench/results/load-2026-12-03.md). On the CPU 256 (SmolLM2-135M: ~0.8 s there).
CALIBRATION_TOKENS = 256
CALIBRATION_GPU_TOKENS = 4096
CALIBRATION_SMALL_TOKENS = 16
CALIBRATION_REPEATS = 3


# Chunks at most queued for ChunkBlender.warm (the least missed dropped past it): a few dozen prompts' worth.
WARM_QUEUE_CHUNKS = 256


# Queued chunks a paced warm computes at once (ChunkBlender.warm_paced), side by side in one pass where they
# share a prefix: one pass's fixed cost for them all.
WARM_BATCH = 4


@dataclass(frozen=True)
class WantedChunk:
    """One chunk ChunkBlender.chunk_kvs is asked for: its store key and tokens, what its KV is computed after on a
    miss, whether the store's shared tier may be read (`read`; False: the fetch policy chose to recompute), and
    how many of the prefix's first tokens other chunks share (`shared`, None: all; ChunkBlender._prefix_cache)."""

    key: ChunkKey
    token_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    read: bool = True
    shared: int | None = None


def chunk_passes(missing: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> int:
    """The forward passes ChunkBlender.chunk_kvs takes to compute these (prefix ids, chunk ids) misses: one a
    distinct prefix, more where a prefix's chunks exceed blend.BATCH_CHUNK_TOKENS (padded to their longest)."""
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for prefix, chunk in missing:
        by_prefix.setdefault(prefix, []).append(len(chunk))
    passes = 0
    for lengths in by_prefix.values():
        group: list[int] = []  # as precompute_chunks groups them
        for length in lengths:
            if group and (len(group) + 1) * max(length, *group) > BATCH_CHUNK_TOKENS:
                passes, group = passes + 1, []
            group.append(length)
        passes += 1
    return passes


@dataclass(frozen=True)
class _WarmChunk:
    """A chunk queued for ChunkBlender.warm: its tokens, what it is computed after, and how many of those
    tokens other chunks share (ChunkBlender.chunk_kv's `shared`)."""

    token_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    shared: int | None


@dataclass(frozen=True)
class Prefetched:
    """A pass's chunks found at once (ChunkBlender.prefetch), for the blends that follow: per chunk key its KV and
    whether the store had it, and where the store said it would come from before any miss was computed
    (ChunkCacheStore.locate: a blend reports those sources, and does not ask the store, a shared tier's round
    trip, again)."""

    kvs: Mapping[ChunkKey, tuple[ChunkKV, bool]]
    sources: Mapping[ChunkKey, ChunkSource]


class ChunkBlender:
    """Blends a prompt's chunks on a LlamaFamilyModel: each chunk's KV from the store (computed and stored on
    a miss), then CacheBlend. Shared by the local engine's runner and the SGLang plugin, so both find chunk KV
    under the same keys."""

    def __init__(self, model: LlamaFamilyModel, store: ChunkCacheStore, chunk_prefix: str = "system",
                 rule: SelectionRule = DEFAULT_RULE, prefix_caches: int = defaults.CHUNK_PREFIX_ENTRIES,
                 channel_weights: bool | None = None, warm_share: float = DEFAULT_WARM_SHARE) -> None:
        """channel_weights: measure each computed chunk's ChannelWeights (precompute_chunk); None: where the
        store encodes entries with a codec that uses them (ChunkCacheStore.encodes_with_channel_weights).
        warm_share: the most of the serving time computing chunks a fallback left uncached may take under load
        (warming.py: WarmPacer)."""
        if chunk_prefix not in CHUNK_PREFIXES:
            raise ValueError(f"chunk_prefix must be one of {', '.join(CHUNK_PREFIXES)}")
        # The KV of the few chunk prefixes in use (system prompt, context), continued for each new chunk.
        self._prefix_caches: LRUCache[tuple[int, ...], KVCache] = LRUCache(prefix_caches)
        self.model = model
        self.store = store
        self.chunk_prefix = chunk_prefix
        self.rule = rule
        self.fingerprint = model_fingerprint(model)
        self.channel_weights = store.encodes_with_channel_weights if channel_weights is None else channel_weights
        # Chunks a prompt prefilled in full left uncached (fallback), to compute off its critical path (warm),
        # paced while requests are served, the most missed first (warming.py).
        self._to_warm: WarmQueue[ChunkKey, _WarmChunk] = WarmQueue(WARM_QUEUE_CHUNKS)
        self.warm_pacer = WarmPacer(warm_share)

    def prefix_for(self, prompt: Prompt, segment: PromptSegment | None = None) -> tuple[int, ...]:
        """What a chunk `segment` of this prompt is computed after (see CHUNK_PREFIXES): the first segment and
        the segment's own context, or the prompt's chunk_context when it has none (or no segment is given:
        what the prompt's chunks without a context of their own share). Empty with chunk_prefix "none"."""
        first = prompt.segments[0]
        if self.chunk_prefix == "none" or first.is_chunk:
            return ()
        context = segment.context if segment is not None and segment.context else prompt.chunk_context
        return first.token_ids + tuple(context)

    def chunk_prefixes(self, prompt: Prompt) -> list[tuple[int, ...]]:
        """prefix_for each of the prompt's chunks, in prompt order."""
        return [self.prefix_for(prompt, segment) for segment in prompt.segments if segment.is_chunk]

    def _prefix_cache(self, prefix_ids: tuple[int, ...], shared: int | None = None) -> KVCache | None:
        """The KV of a chunk prefix. Its first `shared` tokens (all when None: what many chunks are computed
        after, the system prompt and context documents) are computed on first use and kept (a few, least
        recently used dropped); the rest (a chunk's own context) is computed on a copy, continued from them."""
        if not prefix_ids:
            return None
        kept_ids = prefix_ids if shared is None else prefix_ids[:shared]
        found = self._prefix_caches.get(kept_ids) if kept_ids else None
        if found is None and kept_ids:
            found = self.model.new_cache(len(kept_ids))
            self.model.forward(torch.tensor(list(kept_ids), device=self.model.device), None, found)
            self._prefix_caches[kept_ids] = found
        own = prefix_ids[len(kept_ids):]
        if not own:
            return found
        cache = found.clone(len(prefix_ids)) if found is not None else self.model.new_cache(len(prefix_ids))
        self.model.forward(torch.tensor(list(own), device=self.model.device), None, cache)
        return cache

    def chunk_key(self, chunk_prefix: tuple[int, ...], chunk_ids: tuple[int, ...]) -> ChunkKey:
        return ChunkKey.of(self.fingerprint, list(chunk_prefix), list(chunk_ids))

    def _chunk_keys(self, prompt: Prompt, after: int = 0) -> list[tuple[PromptSegment, tuple[int, ...], ChunkKey]]:
        """Each chunk segment of the prompt starting at or after token `after` (those in an exact head before it
        are not blended: blend's `head`), in order, with what it is computed after and its store key."""
        found, start = [], 0
        for segment in prompt.segments:
            start, begins = start + len(segment.token_ids), start
            if segment.is_chunk and begins >= after:
                prefix = self.prefix_for(prompt, segment)
                found.append((segment, prefix, self.chunk_key(prefix, segment.token_ids)))
        return found

    def locate(self, prompt: Prompt) -> list[ChunkSource]:
        """Where each of the prompt's chunks would come from (ChunkCacheStore.locate), in prompt order."""
        return self._locate(self._chunk_keys(prompt))

    def _locate(self, chunk_keys: list[tuple[PromptSegment, tuple[int, ...], ChunkKey]]) -> list[ChunkSource]:
        return self.store.locate([key for _, _, key in chunk_keys],
                                 [len(segment.token_ids) for segment, _, _ in chunk_keys])

    def _shared_prefix_tokens(self, prompt: Prompt) -> int:
        """How many of a chunk prefix's first tokens (the first segment's) every chunk of the prompt is computed
        after (chunk_kv's `shared` for chunks with a context of their own)."""
        first = prompt.segments[0]
        return 0 if self.chunk_prefix == "none" or first.is_chunk else len(first.token_ids)

    def fallback(self, prompt: Prompt, costs: PrefillCosts) -> str | None:
        """weigh's reason: why the prompt is prefilled in full, or None when it blends."""
        return self.weigh(prompt, costs).reason

    def weigh(self, prompt: Prompt, costs: PrefillCosts, head: int = 0) -> FallbackDecision:
        """blend_fallback for this prompt: its chunks, which of them would be read from the store (chunks the
        fetch policy would recompute count as not cached), what fetching those from the shared tier would cost
        (the policy's estimates, in tokens at its prefill rate), and its mode's ratio; with the hits. A prompt
        prefilled in full queues its uncached chunks for warm(). `head`: the tokens of an exact head the blend
        would reuse (blend's `head`): only the chunks after it count."""
        chunk_keys = self._chunk_keys(prompt, head)
        chunks = [segment.token_ids for segment, _, _ in chunk_keys]
        sources = self._locate(chunk_keys)
        policy = self.store.adaptation
        fetch_tokens = None
        if policy is not None:
            rate = policy.prefill.rate
            fetch_tokens = [source.decision.fetch_ms / 1e3 * rate
                            if not source.local and source.hit and source.decision is not None else 0.0
                            for source in sources]
        ratio = 0.0 if prompt.mode == "reuse" else prompt.recompute_ratio
        hits = [source.hit for source in sources]
        missing = [(prefix, segment.token_ids) for (segment, prefix, _), hit in zip(chunk_keys, hits) if not hit]
        reason = blend_fallback([len(ids) for ids in chunks], hits, ratio, costs, fetch_tokens,
                                passes=chunk_passes(missing))
        if reason is not None:
            self._queue_misses(prompt, chunk_keys, hits)
        return FallbackDecision(reason, hits)

    def _queue_misses(self, prompt: Prompt, chunk_keys: list[tuple[PromptSegment, tuple[int, ...], ChunkKey]],
                      hits: list[bool]) -> None:
        """The prompt's chunks not cached, queued for warm(): a prompt prefilled in full because its chunks were
        not cached would otherwise leave them uncached, and the same prompt would be prefilled in full forever
        (the slower-than-full rule weighs this request only). Past WARM_QUEUE_CHUNKS the least missed are
        dropped (warming.WarmQueue)."""
        shared = self._shared_prefix_tokens(prompt)
        for (segment, prefix, key), hit in zip(chunk_keys, hits):
            if hit:
                continue
            self._to_warm.missed(key, _WarmChunk(segment.token_ids, prefix, shared if segment.context else None))

    @property
    def pending_warm(self) -> int:
        """Chunks queued for warm()."""
        return len(self._to_warm)

    def warm(self, limit: int = 1) -> int:
        """Computes and stores up to `limit` of the queued chunks (the most missed first, warming.WarmQueue; one
        already cached meanwhile is skipped), as a blend would on a miss, those after the same prefix in one
        pass (chunk_kvs). Returns how many were computed. Callers run it off requests' critical paths: the local
        engine between its steps, the SGLang plugin after a pass."""
        popped = [self._to_warm.pop() for _ in range(min(limit, len(self._to_warm)))]
        found = self.chunk_kvs([WantedChunk(key, chunk.token_ids, chunk.prefix_ids, shared=chunk.shared)
                                for key, chunk in popped])
        return sum(not hit for _, hit in found)

    def warm_paced(self, busy: bool) -> bool:
        """Up to WARM_BATCH queued chunks computed in one pass (warm) if any is queued and, when `busy` (requests
        are being served), the pacer says a warm is due; returns whether chunks are still queued afterwards."""
        if self._to_warm and (not busy or self.warm_pacer.due()):
            started = time.perf_counter()
            self.warm(WARM_BATCH)
            if busy:
                self.warm_pacer.spent(time.perf_counter() - started)
        return bool(self._to_warm)

    def chunk_kv(self, key: ChunkKey, chunk_ids: tuple[int, ...], prefix_ids: tuple[int, ...],
                 read: bool = True, shared: int | None = None) -> tuple[ChunkKV, bool]:
        """The chunk's KV and whether it came from the store: read from it (from its local tiers only when `read`
        is False: the fetch policy chose to recompute the shared entry, which is then not written to the shared
        tier again), else precomputed after `prefix_ids` and stored. `shared`: how many of the prefix's first
        tokens other chunks are computed after too (their KV is kept for them, _prefix_cache); None: all."""
        return self.chunk_kvs([WantedChunk(key, chunk_ids, prefix_ids, read, shared)])[0]

    def chunk_kvs(self, wanted: list["WantedChunk"],
                  known: Mapping[ChunkKey, tuple[ChunkKV, bool]] | None = None) -> list[tuple[ChunkKV, bool]]:
        """chunk_kv for several chunks, in order: those the store lacks that are computed after the same prefix
        are computed side by side in one forward pass (blend.precompute_chunks), so a prompt's misses, or a
        warm's, pay one pass's fixed cost rather than one each. A chunk asked for twice is computed once (a hit
        the second time). `known`: chunks found already (prefetch: an SGLang pass's requests' chunks in one
        call), taken as they are."""
        found: list[tuple[ChunkKV, bool] | None] = [None] * len(wanted)
        groups: dict[tuple[tuple[int, ...], int | None], list[int]] = {}
        first_of: dict[ChunkKey, int] = {}
        for index, chunk in enumerate(wanted):
            if known is not None and chunk.key in known:
                found[index] = known[chunk.key]
                continue
            if chunk.key in first_of:
                continue
            # Not promoted yet: a hit in CPU memory is streamed up during the prefill, then promoted.
            # The key holds the digest of the chunk's tokens, and the store refuses entries that are not the key's.
            cached = self.store.get(chunk.key, promote=False, shared=chunk.read)
            if cached is not None:
                found[index] = (cached, True)
                continue
            if not chunk.read:
                self.store.note_recomputed()
            first_of[chunk.key] = index
            groups.setdefault((chunk.prefix_ids, chunk.shared), []).append(index)
        for (prefix_ids, shared), indices in groups.items():
            prefix_cache = self._prefix_cache(prefix_ids, shared)
            started = time.perf_counter()
            kvs = precompute_chunks(self.model, [list(wanted[i].token_ids) for i in indices], list(prefix_ids),
                                    prefix_cache, self.channel_weights)
            self._observe_prefill(kvs, started)
            for index, kv in zip(indices, kvs):
                chunk = wanted[index]
                self.store.put(chunk.key, kv, recompute_cost=float(kv.length * self.model.num_layers),
                               share=chunk.read)
                found[index] = (kv, False)
        for index, chunk in enumerate(wanted):
            if found[index] is None:  # asked for again after its first: read back, as it would be one at a time
                found[index] = (found[first_of[chunk.key]][0], True)
        return found

    def _observe_prefill(self, kvs: list[ChunkKV], started: float) -> None:
        """The fetch policy's prefill rate, from chunks precomputed in one pass since `started`
        (time.perf_counter), the pass's fixed cost counted as tokens (as FetchPolicy.decide counts it); nothing
        without a policy."""
        policy = self.store.adaptation
        if policy is None or not kvs:
            return
        if kvs[0].keys.is_cuda:
            torch.cuda.synchronize(kvs[0].keys.device)
        policy.prefill.observe(sum(kv.length for kv in kvs) + policy.costs.pass_tokens, time.perf_counter() - started)

    def measure_prefill(self, tokens: int = CALIBRATION_TOKENS, small: int = CALIBRATION_SMALL_TOKENS,
                        repeats: int = CALIBRATION_REPEATS) -> PrefillCalibration:
        """Time precompute_chunk over `small` and `tokens` placeholder tokens on this device (each size warmed up
        once, then the fastest of `repeats` passes): the prefill's cost per token and per pass
        (fallback.PrefillCalibration). Nothing is stored."""
        ids = [1 + i % (self.model.embed_tokens.shape[0] - 1) for i in range(tokens)]
        timings = []
        with torch.inference_mode():
            for size in (small, tokens):
                precompute_chunk(self.model, ids[:size])
                fastest = float("inf")
                for _ in range(repeats):
                    started = time.perf_counter()
                    kv = precompute_chunk(self.model, ids[:size])
                    if kv.keys.is_cuda:
                        torch.cuda.synchronize(kv.keys.device)
                    fastest = min(fastest, time.perf_counter() - started)
                timings.append(PrefillTiming(size, fastest))
        return PrefillCalibration(*timings)

    def calibrate(self, pass_tokens: float | Literal["auto"], placement_tokens: float) -> PrefillCosts:
        """The prefill cost model to decide with (blend or full prefill: `fallback`; fetch or recompute: the
        store's fetch policy), measured on this device before any request where it is needed. `pass_tokens`: a
        forward pass's fixed cost in tokens, or "auto": measured on a GPU (measure_prefill), where a
        pass's launches make a chunk computed alone cost far more than its tokens, and
        fallback.DEFAULT_PASS_COST_TOKENS on the CPU (SmolLM2-135M's there, measured once: a start-up
        measurement on a busy CPU is too noisy to decide by). With a fetch policy, its costs become these and
        its prefill rate starts from the measurement (its prior is SmolLM2's on 2 CPU cores, which on a GPU
        undervalues recomputing ~50x: bench/results/fetch-ttft-2026-12-01.md)."""
        policy = self.store.adaptation
        on_gpu = self.model.embed_tokens.is_cuda
        measured = None
        if on_gpu and (policy is not None or pass_tokens == "auto"):
            context = getattr(self.model.config, "max_position_embeddings", None) or CALIBRATION_GPU_TOKENS
            measured = self.measure_prefill(min(CALIBRATION_GPU_TOKENS, context))
        elif policy is not None:  # the CPU: the fetch policy's rate only, from one timed pass a size
            measured = self.measure_prefill(repeats=1)
        if pass_tokens == "auto":
            pass_tokens = measured.pass_tokens if on_gpu and measured is not None else DEFAULT_PASS_COST_TOKENS
        costs = PrefillCosts(pass_tokens, placement_tokens)
        if policy is not None and measured is not None:
            policy.costs = costs
            policy.prefill.observe(measured.large.tokens + costs.pass_tokens, measured.large.seconds)
        return costs

    def _wanted(self, chunk_keys: list[tuple[PromptSegment, tuple[int, ...], ChunkKey]],
                sources: list[ChunkSource], shared: int) -> list[WantedChunk]:
        """What chunk_kvs is asked for these chunks (_chunk_keys) found where `sources` say (_locate)."""
        # A chunk of its own context continues the first segment's KV; the others share their prefix.
        return [WantedChunk(key, segment.token_ids, chunk_prefix, read=source.decision is None or source.decision.fetch,
                            shared=shared if segment.context else None)
                for (segment, chunk_prefix, key), source in zip(chunk_keys, sources)]

    def _first_segment(self, prompt: Prompt) -> WantedChunk | None:
        """The first segment (system prompt and header) as a chunk of its own, computed alone from position 0,
        which is exact, so a blend reuses its KV as is; None when the prompt opens with a chunk or has one
        segment."""
        first = prompt.segments[0]
        if first.is_chunk or len(prompt.segments) < 2:
            return None
        return WantedChunk(ChunkKey.of(self.fingerprint, [], list(first.token_ids)), first.token_ids, ())

    def prefetch(self, prompts: list[tuple[Prompt, int]]) -> Prefetched:
        """The chunks of several prompts, each after its exact head's first tokens (blend's `head`; 0: none), found
        in one chunk_kvs call: the misses of all of them computed side by side, one pass a distinct prefix (an
        SGLang pass's RAG requests share their system prompt: one pass for all their misses, where each request
        computing its own took a pass each). Hand the result to blend as `known`."""
        wanted, sources = [], {}
        for prompt, after in prompts:
            first = self._first_segment(prompt) if after == 0 else None  # past an exact head: not needed
            chunk_keys = self._chunk_keys(prompt, after)
            located = self._locate(chunk_keys)
            sources.update((key, source) for (_, _, key), source in zip(chunk_keys, located))
            wanted += ([first] if first is not None else []) + \
                self._wanted(chunk_keys, located, self._shared_prefix_tokens(prompt))
        found: dict[ChunkKey, tuple[ChunkKV, bool]] = {}
        for chunk, kv in zip(wanted, self.chunk_kvs(wanted)):
            found.setdefault(chunk.key, kv)  # a chunk two prompts share: as the first found it
        return Prefetched(found, sources)

    def blend(self, prompt: Prompt, logits: bool = True, rule: SelectionRule | None = None,
              head: ExactHead | None = None,
              known: Prefetched | None = None) -> tuple[BlendResult, PrefillReport]:
        """The prompt prefilled in its mode ("reuse" or "blend") by `rule` (default: the blender's), and the
        report of what was reused and recomputed. `head`: the exact KV of the prompt's first head.length tokens
        (at least its first segment), e.g. SGLang's radix-cache match: reused as is; only the chunks starting
        after it are blended (and reported), a chunk it ends inside is computed exactly from there. Raises
        ValueError when the head is not the prompt's first tokens or shorter than its first segment. `known`:
        chunks found already (prefetch), used as they are."""
        inputs = self._blend_inputs(prompt, head, known, logits, rule)
        result = blend_prefill(self.model, inputs.job.segments, inputs.job.recompute_ratio,
                               prefix_kv=inputs.job.prefix_kv, logits=logits, rule=inputs.job.rule,
                               target_fidelity=inputs.job.target_fidelity)
        return result, self._blended(prompt, inputs, result)

    def blend_many(self, prompts: list[tuple[Prompt, ExactHead | None]], logits: bool = True,
                   known: Prefetched | None = None) -> list[tuple[BlendResult, PrefillReport]]:
        """blend for several prompts (each with its exact head, or None), their layers run together
        (blend.blend_prefill_batch: one set of matrix products a layer over all their computed rows): an SGLang
        pass's RAG requests. Give `known` (prefetch) to have all their uncached chunks computed in one pass
        beforehand. The same results and reports as blend of each; raises ValueError as blend does."""
        inputs = [self._blend_inputs(prompt, head, known, logits, None) for prompt, head in prompts]
        results = blend_prefill_batch(self.model, [i.job for i in inputs])
        return [(result, self._blended(prompt, i, result))
                for (prompt, _), i, result in zip(prompts, inputs, results)]

    def _blend_inputs(self, prompt: Prompt, head: ExactHead | None,
                      known: Prefetched | None, logits: bool, rule: SelectionRule | None) -> "_BlendInputs":
        """What blend_prefill is given for the prompt (its chunks' KV found or computed), and what its report
        needs."""
        ratio = 0.0 if prompt.mode == "reuse" else prompt.recompute_ratio
        first = prompt.segments[0]
        shared = self._shared_prefix_tokens(prompt)
        skip = head.length if head is not None else 0
        if head is not None and (skip < len(first.token_ids) or
                                 head.token_ids.tolist() != prompt.token_ids[:skip]):
            raise ValueError("an exact head must be the prompt's first tokens, its first segment at least")
        chunk_keys = self._chunk_keys(prompt, skip)
        if head is not None and not chunk_keys:
            raise ValueError("no chunk of the prompt starts after its exact head: nothing to blend")
        if known is not None and all(key in known.sources for _, _, key in chunk_keys):
            sources = [known.sources[key] for _, _, key in chunk_keys]  # as the prefetch found them
        else:
            sources = self._locate(chunk_keys)
        segments = [head.token_ids.tolist()] if head is not None else []
        hits, found = [], []
        wanted = self._wanted(chunk_keys, sources, shared)
        # The misses computed side by side, a pass a prefix (or by the prefetch already).
        kvs = iter(self.chunk_kvs(wanted, known.kvs if known is not None else None))
        start = 0
        for segment in prompt.segments:
            start, begins = start + len(segment.token_ids), start
            if start <= skip:  # within the exact head
                continue
            if begins < skip:  # the head ends inside it: the rest computed
                segments.append(list(segment.token_ids[skip - begins:]))
            elif segment.is_chunk:
                kv, hit = next(kvs)
                segments.append(kv)
                hits.append(hit)
                found.append((wanted[len(hits) - 1].key, kv))
            else:
                segments.append(list(segment.token_ids))
        shared_fetch = [shared_fetch_words(source, hit) for source, hit in zip(sources, hits)]
        # The first segment (system prompt and header) computed alone is exact, so its KV is reused as is.
        prefix_kv = head
        first_wanted = self._first_segment(prompt) if head is None else None
        if first_wanted is not None:
            prefix_kv, _ = self.chunk_kvs([first_wanted], known.kvs if known is not None else None)[0]
            found.append((first_wanted.key, prefix_kv))
        target = prompt.fidelity_target if prompt.mode == "blend" else None
        job = BlendJob(segments, ratio, prefix_kv, logits, rule or self.rule, target)
        return _BlendInputs(job, hits, found, shared_fetch)

    def _blended(self, prompt: Prompt, inputs: "_BlendInputs", result: BlendResult) -> PrefillReport:
        """After the prompt's blend: its chunks promoted, their measured sensitivity noted, and its report."""
        job = inputs.job
        for key, kv in inputs.found:
            self.store.promote(key, kv)
        if result.chunk_drift is not None:  # each chunk's measured sensitivity, into its entry (Cache-Craft)
            for (key, _), drift in zip(inputs.found, result.chunk_drift.tolist()):
                self.store.note_sensitivity(key, drift)
        target = job.target_fidelity
        return PrefillReport(
            mode=prompt.mode, hits=inputs.hits, recompute_ratio=round(result.recompute_ratio, 4),
            chunk_tokens=result.chunk_tokens, recomputed_tokens=result.recomputed_chunk_tokens,
            recomputed_per_chunk=per_chunk_counts(result), selection=job.rule.score if job.recompute_ratio else None,
            compute_share=round(result.compute_share, 4),
            prefix_tokens_reused=job.prefix_kv.length if job.prefix_kv is not None else 0, fidelity_target=target,
            fidelity_estimate=None if target is None or result.covered is None else round(result.covered, 4),
            shared_fetch=inputs.shared_fetch if self.store.shared is not None else None)


@dataclass(frozen=True)
class _BlendInputs:
    """One prompt's blend as ChunkBlender prepares it: blend_prefill's arguments, and for its report and store
    updates the chunks' hit flags, (key, KV) of what it read or computed, and the shared-tier words."""

    job: BlendJob
    hits: list[bool]
    found: list[tuple[ChunkKey, ChunkKV]]
    shared_fetch: list[str]


def shared_fetch_words(source: ChunkSource, hit: bool) -> str:
    """The prefill report's `shared_fetch` words for one chunk: "local" (read from a local tier), "fetched" (read
    from the shared tier), "recomputed: <why>" (the fetch policy found fetching slower), "not cached" (no tier
    held it, or the entry was gone or damaged when read)."""
    recompute = source.decision is not None and not source.decision.fetch
    if not hit:
        return source.decision.summary if recompute else "not cached"
    # A chunk to recompute that is a hit was computed locally meanwhile (it recurs in the prompt).
    return "local" if source.local or recompute else "fetched"


def per_chunk_counts(result: BlendResult) -> list[int]:
    """How many of each chunk's tokens the blend recomputed (chunks in prompt order)."""
    starts = [start for start, _ in result.chunk_spans]
    counts = [0 for _ in starts]
    if result.selected_rows is not None:
        for slot in result.selected_rows.tolist():
            counts[bisect.bisect_right(starts, slot) - 1] += 1
    return counts


class BlendingRunner(LlamaRunner):
    def __init__(self, loaded: LoadedModel, store: ChunkCacheStore, prefix_entries: int = defaults.PREFIX_ENTRIES,
                 chunk_prefix: str = "system", rule: SelectionRule = DEFAULT_RULE,
                 costs: PrefillCosts = PrefillCosts(),
                 chunk_prefix_entries: int = defaults.CHUNK_PREFIX_ENTRIES,
                 channel_weights: bool | None = None) -> None:
        super().__init__(loaded)
        self.blender = ChunkBlender(self.model, store, chunk_prefix, rule, chunk_prefix_entries, channel_weights)
        self.store = store
        self.costs = costs
        self._prefixes: LRUCache[str, KVCache] = LRUCache(prefix_entries)  # exact prefixes, by token digest

    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState]:
        started = time.perf_counter()
        decision = self.blender.weigh(prompt, self.costs) \
            if prompt.has_chunks and prompt.mode in ("reuse", "blend") else None
        fallback = decision.reason if decision is not None else None
        if not prompt.has_chunks or prompt.mode == "full_prefill" or fallback is not None:
            logits, state = super().prefill(prompt)
            # A fallback's report says which chunks were cached, so hit rates count it too.
            report = PrefillReport(mode="full_prefill", recompute_ratio=1.0,
                                   requested_mode=prompt.mode if fallback is not None else None, fallback=fallback,
                                   hits=decision.hits if fallback is not None else None)
        elif prompt.mode == "prefix":
            logits, state, reused = self._prefix_prefill(prompt)
            report = PrefillReport(mode="prefix", prefix_tokens_reused=reused)
        else:
            result, report = self.blender.blend(prompt)
            logits, state = result.logits, KVState(cache=result.cache, length=len(prompt))
        if prompt.has_chunks:
            state.report = dataclasses.replace(report, prefill_ms=round((time.perf_counter() - started) * 1000, 2))
        return logits, state

    def warm_step(self, busy: bool) -> bool:
        """Chunks a full-prefill fallback left uncached (up to WARM_BATCH), computed and stored, paced while
        `busy` (ChunkBlender.warm_paced); whether chunks are still queued. The engine calls it between its steps."""
        return self.blender.warm_paced(busy)

    # -- prefix caching -----------------------------------------------------------------------------
    def _prefix_prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState, int]:
        # Reusable prefixes end after the first segment, and after the first chunk.
        boundaries, length = [len(prompt.segments[0].token_ids)], 0
        for segment in prompt.segments:
            length += len(segment.token_ids)
            if segment.is_chunk:
                boundaries.append(length)
                break
        boundaries = sorted({b for b in boundaries if b < len(prompt)})
        ids = prompt.token_ids
        cache, reused = None, 0
        for boundary in reversed(boundaries):
            digest = token_digest(ids[:boundary])
            found = self._prefixes.get(digest)  # a hit is the most recent now
            if found is not None:
                cache, reused = found.clone(len(prompt) + 64), boundary
                break
        if cache is None:
            cache = self.model.new_cache(len(prompt) + 64)
        logits = None
        start = reused
        for boundary in [b for b in boundaries if b > reused] + [len(prompt)]:
            piece = torch.tensor(ids[start:boundary], device=self.device)
            logits = self.model.forward(piece, None, cache)
            if boundary < len(prompt):
                self._remember(token_digest(ids[:boundary]), cache)
            start = boundary
        return logits[-1], KVState(cache=cache, length=len(prompt)), reused

    def _remember(self, digest: str, cache: KVCache) -> None:
        self._prefixes[digest] = cache.clone()  # past the bound the least recently used goes
