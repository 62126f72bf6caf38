"""CacheBlend (arXiv 2405.16444) on our Llama-family forward pass.

A RAG prompt is prefix + chunks + suffix (the question). Each chunk's KV is computed once, alone (after
a fixed chunk prefix), and kept with unrotated keys. To prefill a prompt:

1. every chunk's cached KV is placed at the chunk's positions in the prompt, keys rotated there (exactly
   what computing them at those positions gives);
2. layer 0 runs in full (its KV depends only on the tokens, so it equals the cache anyway);
3. at layer 1 every token's KV is computed fresh and compared with the cache; the chunk tokens whose
   values deviate most (the top `recompute_ratio` of them) are selected;
4. from layer 1 on, only the selected tokens and the suffix are computed; the other chunk tokens keep their
   cached KV. Attention of computed tokens sees every slot whose position is not after theirs.

recompute_ratio 1.0 computes every token at every layer (full prefill); 0.0 keeps every chunk's own KV,
as if each chunk had been computed in a block of its own (full reuse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.llama import KVCache, LlamaFamilyModel
from ..engine.staging import upload
from ..kernels.attention import plan_causal, plan_sparse
from ..kernels.drift import drift_apply, drift_deltas
from ..kernels.rope import place, place_many, rope_store, rotate
from ..kernels.selection import deviation
from .channel_weights import key_weights
from .kv import ChunkKV, ExactHead
from .probe import ProbeGraphs, probe_eager
from .probe_weights import probe_projections
from .selection import (
    DEFAULT_RULE,
    SelectionRule,
    aligned_count,
    compute_share,
    selected_count,
    sink_count,
    targeted_count,
    uniform_counts,
)


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def precompute_chunk(model: LlamaFamilyModel, chunk_ids: list[int], prefix_ids: list[int] = (),
                     prefix_cache: KVCache | None = None, channel_weights: bool = False) -> ChunkKV:
    """The chunk's KV as computed after `prefix_ids` (e.g. the system prompt), keys kept unrotated; with
    `channel_weights`, its keys' channel weights measured on the chunk's own queries (channel_weights.py: what the
    cachegen encoder spends its bins by; a few reductions a layer, so only where a tier encodes with them).
    `prefix_cache`: the prefix's KV already computed (model.forward over `prefix_ids` alone), which is then
    continued instead of computed again (the same numbers: a prefix's KV does not depend on what follows)."""
    raw: list[tuple[torch.Tensor, torch.Tensor]] = []
    queries: list[torch.Tensor] | None = [] if channel_weights else None
    if prefix_cache is not None and prefix_cache.length == len(prefix_ids) and len(prefix_ids):
        cache = prefix_cache.clone(len(prefix_ids) + len(chunk_ids))
        model.forward(torch.tensor(list(chunk_ids), device=model.device), None, cache, raw_kv=raw,
                      raw_queries=queries)
        start = 0
    else:
        ids = torch.tensor([*prefix_ids, *chunk_ids], device=model.device)
        start = len(prefix_ids)
        model.forward(ids, None, model.new_cache(ids.shape[0]), raw_kv=raw, raw_queries=queries)
    keys = torch.stack([k[:, start:] for k, _ in raw])
    values = torch.stack([v[:, start:] for _, v in raw])
    weights = key_weights([q[:, start:] for q in queries], model.kv_heads) if queries and len(chunk_ids) else None
    return ChunkKV(token_ids=torch.tensor(list(chunk_ids)), keys=keys, values=values, weights=weights)


# The most chunk tokens precompute_chunks computes in one pass (chunks beyond it go to further passes): an 8B
# model's MLP activations for 8,192 tokens take ~0.5 GB.
BATCH_CHUNK_TOKENS = 8192


@torch.no_grad()
def precompute_chunks(model: LlamaFamilyModel, chunks: list[list[int]], prefix_ids: list[int] = (),
                      prefix_cache: KVCache | None = None, channel_weights: bool = False) -> list[ChunkKV]:
    """Several chunks' KV, each as precompute_chunk computes it after the same `prefix_ids`, in one forward pass
    a BATCH_CHUNK_TOKENS of chunk tokens: the chunks run side by side, padded at their ends to the longest, each
    attending to the prefix's KV and to its own earlier tokens only (causal from the bottom right). A pass's
    fixed cost (its launches: ~20 ms for an 8B model inside SGLang's process, chunkcache/fallback.py) is paid
    once for them all instead of once a chunk. `prefix_cache`: the prefix's KV (model.forward over prefix_ids
    alone), computed here when not given. Returns one ChunkKV per chunk, in order. Raises ValueError for an
    empty chunk."""
    if any(not chunk for chunk in chunks):
        raise ValueError("a chunk needs tokens")
    if len(chunks) <= 1:
        return [precompute_chunk(model, list(chunk), list(prefix_ids), prefix_cache, channel_weights)
                for chunk in chunks]
    prefix = len(prefix_ids)
    if prefix and (prefix_cache is None or prefix_cache.length != prefix):
        prefix_cache = model.new_cache(prefix)
        model.forward(torch.tensor(list(prefix_ids), device=model.device), None, prefix_cache)
    done: list[ChunkKV] = []
    group: list[list[int]] = []
    for chunk in [*chunks, None]:
        if chunk is None or (group and (len(group) + 1) * max(len(chunk), *map(len, group)) > BATCH_CHUNK_TOKENS):
            done += _precompute_side_by_side(model, group, prefix_cache if prefix else None, channel_weights)
            group = []
        if chunk is not None:
            group.append(list(chunk))
    return done


def _precompute_side_by_side(model: LlamaFamilyModel, chunks: list[list[int]], prefix_cache: KVCache | None,
                             channel_weights: bool) -> list[ChunkKV]:
    """precompute_chunks' one pass over `chunks` (side by side, [chunks, longest] tokens)."""
    from torch.nn.attention.bias import causal_lower_right

    count, longest = len(chunks), max(map(len, chunks))
    prefix = prefix_cache.length if prefix_cache is not None else 0
    ids = torch.zeros((count, longest), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        ids[row, :len(chunk)] = torch.tensor(chunk)
    hidden = torch.nn.functional.embedding(ids.flatten().to(model.device), model.embed_tokens)
    cos, sin = model.rope_table(prefix + longest)
    cos, sin = cos[prefix:], sin[prefix:]
    heads, kv_heads, dim = model.heads, model.kv_heads, model.head_dim
    # Each query sees the prefix and its chunk's tokens up to its own (the padding after a chunk, last, is seen
    # by none of its tokens).
    mask = causal_lower_right(longest, prefix + longest) if prefix else None
    keys, values, queries = [], [], [] if channel_weights else None

    def side(x: torch.Tensor, n: int) -> torch.Tensor:
        """[n heads, count * longest, dim] as [count, n, longest, dim] (a view)."""
        return x.reshape(n, count, longest, dim).transpose(0, 1)

    for layer in range(model.num_layers):
        q, k, v = model.split_qkv(model.project_qkv(layer, hidden))  # [heads or kv_heads, count * longest, dim]
        keys.append(k)
        values.append(v)
        if queries is not None:
            queries.append(q)
        q, k, v = rotate(side(q, heads), cos, sin), rotate(side(k, kv_heads), cos, sin), side(v, kv_heads)
        if prefix:
            k = torch.cat((prefix_cache.keys[layer, :, :prefix].expand(count, -1, -1, -1), k), dim=2)
            v = torch.cat((prefix_cache.values[layer, :, :prefix].expand(count, -1, -1, -1), v), dim=2)
        if heads != kv_heads:  # each query head's KV head, for the one kernel that takes every shape here
            k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not prefix)
        hidden = model.finish_layer(layer, hidden, out.transpose(1, 2).reshape(count * longest, heads * dim))
    found = []
    for row, chunk in enumerate(chunks):
        span = slice(row * longest, row * longest + len(chunk))
        weights = key_weights([q[:, span] for q in queries], kv_heads) if queries is not None else None
        found.append(ChunkKV(token_ids=torch.tensor(chunk), keys=torch.stack([k[:, span] for k in keys]),
                             values=torch.stack([v[:, span] for v in values]), weights=weights))
    return found


@dataclass
class BlendResult:
    logits: torch.Tensor | None  # [vocab] of the last prompt token (None when the caller asked for hidden)
    cache: KVCache  # the prompt's KV, ready for decoding
    chunk_tokens: int
    recomputed_chunk_tokens: int
    hidden: torch.Tensor | None = None  # [hidden] of the last prompt token, before the final norm
    # The share of (chunk token, layer) pairs computed (selection.compute_share): the blend's real cost.
    compute_share: float = 0.0
    # Quality-targeted mode: the share of the selection score the recomputed tokens cover (None otherwise).
    covered: float | None = None
    # Prompt rows (slots) of the recomputed chunk tokens, [recomputed_chunk_tokens] on the model's device.
    selected_rows: torch.Tensor | None = None
    chunk_spans: list[tuple[int, int]] = field(default_factory=list)  # (first slot, tokens) of each chunk
    # Each chunk's measured sensitivity to its context (Cache-Craft, arXiv 2502.15734): the mean squared
    # difference between fresh and cached KV of its recomputed tokens, per element, at the middle layer (keys
    # before rotation); [chunks] float32, NaN for a chunk with none recomputed; None when not measured (the
    # drift shift measures it, at no extra pass).
    chunk_drift: torch.Tensor | None = None

    @property
    def recompute_ratio(self) -> float:
        return self.recomputed_chunk_tokens / self.chunk_tokens if self.chunk_tokens else 0.0


# cuBLAS multiplies a multiple of 128 rows at full speed but a few rows past one up to a fifth slower per row
# (bench/gemm_rows.py on the H100: Llama-3-8B's four products take 396 us for 640 rows, 471 us for 646), and
# a blend's later layers are nearly all matrix products over the computed rows.
GPU_ROW_ALIGNMENT = 128


def place_chunk(cache: KVCache, kv: ChunkKV, start: int, cos: torch.Tensor, sin: torch.Tensor,
                layers: slice = slice(None)) -> None:
    """A chunk's KV (these layers) into the cache at slots from `start`, keys rotated to those positions;
    copied to the cache's device first when it lives elsewhere (queued, not waited for, from pinned memory)."""
    device = cache.keys.device
    span = slice(start, start + kv.length)
    keys = kv.keys[layers].to(device, non_blocking=True)
    values = kv.values[layers].to(device, non_blocking=True)
    place(keys, values, cache.keys[layers], cache.values[layers], start, cos[span], sin[span])


class ChunkLoader:
    """Puts each chunk's cached KV into the request's cache at its slots, keys rotated to its positions.

    Chunks already on the GPU are placed for every needed layer at once (one fused launch for all of them).
    Chunks in (pinned) CPU memory are copied up on a side stream in groups of `group` layers, one group
    ahead of the compute, which waits only for the group it is about to use: the copy hides behind earlier
    layers. Groups rather than single layers because each copy and launch costs host time (about 20 us a
    launch on the H100 machine), which per layer and chunk would make the host the bottleneck."""

    def __init__(self, cache: KVCache, placements: list[tuple[ChunkKV, int]], cos: torch.Tensor,
                 sin: torch.Tensor, first_layer: int, group: int = 4) -> None:
        self.cache, self.cos, self.sin = cache, cos, sin
        self.first_layer, self.group = first_layer, group
        self.layers = cache.keys.shape[0]
        device = cache.keys.device
        resident = [(kv, start) for kv, start in placements if kv.keys.device == device]
        self.streamed = [(kv, start) for kv, start in placements if kv.keys.device != device]
        layers = slice(first_layer, self.layers)
        place_many([(kv.keys[layers], kv.values[layers], start) for kv, start in resident], cache.keys[layers],
                   cache.values[layers], cos, sin)
        self.stream = None
        self.events: dict[int, torch.cuda.Event] = {}
        self.waited: torch.cuda.Event | None = None
        self.next_layer = first_layer
        if self.streamed and device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            # The cache's memory may have been in use on the compute stream until just now.
            self.stream.wait_stream(torch.cuda.current_stream(device))
            self._issue_through(first_layer)  # starts copying while the layers before it compute
        elif self.streamed:  # no GPU: plain copies
            for kv, start in self.streamed:
                place_chunk(cache, kv, start, cos, sin, slice(first_layer, self.layers))
            self.streamed = []

    def _issue_through(self, layer: int) -> None:
        """Queue the copies of every group up to the one holding `layer` on the side stream."""
        while self.next_layer < self.layers and self.next_layer <= layer:
            layers = slice(self.next_layer, min(self.next_layer + self.group, self.layers))
            with torch.cuda.stream(self.stream):
                for kv, start in self.streamed:
                    place_chunk(self.cache, kv, start, self.cos, self.sin, layers)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events.update({index: event for index in range(layers.start, layers.stop)})
            self.next_layer = layers.stop

    def ready_all(self) -> None:
        """Block the compute stream until every layer's chunk KV is in place."""
        for layer in range(self.first_layer, self.layers):
            self.ready(layer)

    def ready(self, layer: int) -> None:
        """Block the compute stream until the chunks' KV of `layer` is in place (no host wait)."""
        if self.stream is None or layer < self.first_layer:
            return
        self._issue_through(layer + self.group)
        event = self.events.pop(layer, None)  # None: already waited for (a probe pass came first)
        if event is not None and event is not self.waited:  # once per group
            torch.cuda.current_stream(self.cache.keys.device).wait_event(event)
            self.waited = event


@dataclass
class _Layout:
    """A prompt's rows as blending sees them, all known on the host: index tensors (long, CPU) built with
    numpy from the segments' spans, uploaded to the GPU in one copy (`upload`)."""

    ids: torch.Tensor  # [total] the prompt's token ids
    exact: int  # leading rows reused exactly (the prefix)
    chunk_rows: torch.Tensor  # global slots of chunk tokens, in order
    other_rows: torch.Tensor  # global slots of computed non-chunk tokens (markers, question), in order
    vote_rows: torch.Tensor  # global slots of the last segment (the question): the rows that score chunks
    chunk_of: torch.Tensor  # [total] each slot's chunk index (in order), -1 outside chunks
    chunk_lengths: list[int]  # tokens of each chunk, in order
    placements: list[tuple[ChunkKV, int]]

    @property
    def total(self) -> int:
        return int(self.ids.shape[0])

    def upload(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token ids, other rows - exact, chunk rows - exact, chunk_of) on `device`: one copy through a reused
        pinned buffer (engine/staging.py), queued behind the stream's work rather than waiting for it."""
        parts = (self.ids, self.other_rows - self.exact, self.chunk_rows - self.exact, self.chunk_of)
        return upload(torch.cat(parts), device).split([part.shape[0] for part in parts])


def _layout(segments: list, prefix_kv: ChunkKV | ExactHead | None) -> _Layout:
    if not segments or isinstance(segments[-1], ChunkKV) or not len(segments[-1]):
        raise ValueError("blending needs computed tokens (the question) after the last chunk")
    exact = 0  # leading rows whose KV is reused exactly
    if prefix_kv is not None:
        if isinstance(segments[0], ChunkKV) or list(segments[0]) != prefix_kv.token_ids.tolist():
            raise ValueError("prefix_kv must be the KV of the first segment's tokens")
        exact = prefix_kv.length
    ids, chunk_spans, other_spans, placements, lengths = [], [], [], [], []
    total = 0
    for segment in segments:
        start = total
        if isinstance(segment, ChunkKV):
            ids.append(segment.token_ids.numpy().astype(np.int64, copy=False))
            total += segment.length
            placements.append((segment, start))
            chunk_spans.append(np.arange(start, total))
            lengths.append(segment.length)
        else:
            ids.append(np.asarray(segment, dtype=np.int64))
            total += len(segment)
            other_spans.append(np.arange(max(start, exact), total))
    chunk_of = np.full(total, -1, dtype=np.int64)
    for index, (kv, start) in enumerate(placements):
        chunk_of[start: start + kv.length] = index
    joined = lambda spans: torch.from_numpy(np.concatenate(spans) if spans else np.zeros(0, np.int64))  # noqa: E731
    vote = torch.arange(total - len(segments[-1]), total)
    return _Layout(joined(ids), exact, joined(chunk_spans), joined(other_spans), vote, torch.from_numpy(chunk_of),
                   lengths, placements)


def _fresh_deviation(model: LlamaFamilyModel, rule: SelectionRule, layer: int, qkv: torch.Tensor, cache: KVCache,
                     rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Deviation of these rows' fresh KV (from `qkv`, [rows, ...]) from the cache's at their slots `rows`."""
    _, keys, values = model.split_qkv(qkv)
    score = torch.zeros(rows.shape[0], dtype=torch.float32, device=qkv.device)
    if rule.score in ("value", "kv", "attention_value"):
        score += deviation(values, cache.values[layer][:, rows])
    if rule.score in ("key", "kv", "attention_key"):
        score += deviation(rotate(keys, cos[rows], sin[rows]).contiguous(), cache.keys[layer][:, rows])
    return score


class _DriftShift:
    """Corrects the KV of the chunk tokens not recomputed by the drift seen on those recomputed: at each layer,
    the mean difference between fresh and cached KV of a chunk's recomputed tokens (keys compared before
    rotation; shrunk toward the mean over all chunks when a chunk has few) is added, times `strength`, to the
    cached KV of the chunk's other tokens. Much of a chunk's drift is shared by its tokens (its context shifts
    every key alike), so this moves all of them toward their fresh KV. Three launches a layer on CUDA
    (kernels/drift.py): the recomputed tokens' deltas, the per-chunk means as one matrix product, the shift."""

    PRIOR_WEIGHT = 4.0  # recomputed tokens' worth of the all-chunks mean in each chunk's estimate
    BIN_PRIOR_WEIGHT = 4.0  # recomputed tokens' worth of the chunk's mean in each part's estimate (drift_bins)

    def __init__(self, model: LlamaFamilyModel, cache: KVCache, chunks: int, chunk_of: torch.Tensor,
                 chunk_slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, strength: float,
                 chunk_start: torch.Tensor | None = None, chunk_length: torch.Tensor | None = None,
                 skip_first: int = 0, bins: int = 1) -> None:
        """chunk_of [total] long: each slot's chunk (-1 outside chunks); chunk_slots: the chunk tokens' slots;
        chunk_start / chunk_length [chunks] long: each chunk's first slot and length (needed for `skip_first`
        and `bins`); skip_first: each chunk's first tokens measure no drift (sinks); bins: the drift mean per
        this many equal parts of each chunk. All on the cache's device."""
        self.model, self.cache, self.cos, self.sin, self.strength = model, cache, cos, sin, strength
        self.chunks, self.chunk_of, self.chunk_slots = chunks, chunk_of, chunk_slots
        self.chunk_start, self.chunk_length, self.skip_first, self.bins = chunk_start, chunk_length, skip_first, bins
        if (skip_first or bins > 1) and (chunk_start is None or chunk_length is None):
            raise ValueError("skip_first and bins need the chunks' starts and lengths")
        self.recomputed = self.rows = self.weights = self.stale = self.stale_chunk = None
        self.deltas = self.mean = self.members = None
        self.measure_layer = model.num_layers // 2
        self.chunk_drift: torch.Tensor | None = None

    def _part(self, slots: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Each slot's part index (chunk * bins + part of its chunk) for slots of chunks `which`."""
        offset = slots - self.chunk_start[which]
        part = torch.clamp(offset * self.bins // self.chunk_length[which].clamp(min=1), max=self.bins - 1)
        return which * self.bins + part

    def select(self, recomputed: torch.Tensor, rows: torch.Tensor) -> None:
        """The recomputed chunk tokens from now on: their slots, and their rows among the computed rows."""
        self.recomputed, self.rows = recomputed, rows
        count = recomputed.shape[0]
        which = self.chunk_of[recomputed]
        # [chunks, recomputed] one-hot (F.one_hot checks its input on the host: a wait for the GPU)
        members = torch.zeros(self.chunks, count, dtype=torch.float32, device=recomputed.device)
        members.scatter_(0, which[None], 1.0)  # a scalar argument: no host-to-device copy to wait for
        counts = members.sum(dim=1, keepdim=True)
        self.members = members / counts  # each chunk's average over its recomputed tokens (NaN: none)
        if self.skip_first:  # the sinks measure no drift: their columns out of the means
            measured = (recomputed - self.chunk_start[which] >= self.skip_first).to(torch.float32)
            members = members * measured[None]
            counts = members.sum(dim=1, keepdim=True)
        # mean_c = (sum over c's tokens + PRIOR_WEIGHT * mean over all) / (tokens of c + PRIOR_WEIGHT)
        measured_columns = members.sum(dim=0, keepdim=True)  # 1 for each recomputed token that measures drift
        overall = measured_columns / measured_columns.sum().clamp(min=1.0)
        weights = (members + self.PRIOR_WEIGHT * overall) / (counts + self.PRIOR_WEIGHT)
        if self.bins > 1:  # per part: (sum over the part's tokens + BIN_PRIOR_WEIGHT * chunk mean) / (n + weight)
            parts = torch.zeros(self.chunks * self.bins, count, dtype=torch.float32, device=recomputed.device)
            parts.scatter_(0, self._part(recomputed, which)[None], 1.0)
            parts = parts * measured_columns  # measured tokens only (sinks skipped)
            part_counts = parts.sum(dim=1, keepdim=True)
            chunk_weights = weights.repeat_interleave(self.bins, dim=0)
            weights = (parts + self.BIN_PRIOR_WEIGHT * chunk_weights) / (part_counts + self.BIN_PRIOR_WEIGHT)
        # One product a layer for every key and value head (the deltas token-major), into buffers kept for
        # every layer.
        kv_heads, head_dim = self.cache.keys.shape[1], self.cache.keys.shape[3]
        self.weights = weights.contiguous()
        self.deltas = torch.empty(count, 2 * kv_heads, head_dim, dtype=torch.float32, device=recomputed.device)
        self.mean = torch.empty(weights.shape[0], 2 * kv_heads, head_dim, dtype=torch.float32,
                                device=recomputed.device)
        fresh = torch.zeros_like(self.chunk_of, dtype=torch.int8).index_fill_(0, recomputed, 1)
        # The chunk slots not recomputed, in order: a stable sort puts them first, and their count is known
        # (a boolean mask would wait for the GPU to count them).
        order = torch.sort(fresh[self.chunk_slots], stable=True).indices[: self.chunk_slots.shape[0] - count]
        self.stale = self.chunk_slots[order]
        self.stale_chunk = self.chunk_of[self.stale]
        if self.bins > 1:
            self.stale_chunk = self._part(self.stale, self.stale_chunk)

    def store_and_correct(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
        """rope_store's work for this layer (`qkv` of the computed rows at `slots`), then the correction;
        returns the rotated queries."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.recomputed is None or self.recomputed.numel() == 0:
            return rope_store(qkv, self.model.heads, cos, sin, keys, values, slots)
        deltas = drift_deltas(qkv, self.rows, self.model.heads, keys, values, self.recomputed, self.cos, self.sin,
                              out=self.deltas)
        torch.mm(self.weights, deltas.view(deltas.shape[0], -1), out=self.mean.view(self.mean.shape[0], -1))
        mean = self.mean  # [chunks, 2 kv_heads, head_dim]
        if layer == self.measure_layer:
            self.chunk_drift = self.members @ deltas.square().mean(dim=(1, 2))
        q = rope_store(qkv, self.model.heads, cos, sin, keys, values, slots)
        drift_apply(mean, self.stale_chunk, self.stale, self.strength, keys, values, self.cos, self.sin)
        return q


def _choose(rule: SelectionRule, score: torch.Tensor, count: int, lengths: list[int]) -> torch.Tensor:
    """Indices (into the chunk tokens, ascending) of the `count` tokens to recompute, by `score`
    [chunk tokens]: each chunk's first sink_count(...) tokens first, then the top scores, over all chunks
    ("global") or in proportion to each chunk's length ("uniform")."""
    if rule.neighbours:  # each token at the best score within `neighbours` of it, chunk by chunk
        width, pooled, start = 2 * rule.neighbours + 1, [], 0
        for length in lengths:
            part = score[start: start + length].float()[None, None]
            pooled.append(torch.nn.functional.max_pool1d(part, width, 1, rule.neighbours)[0, 0].to(score.dtype)
                          if length else part[0, 0])
            start += length
        score = torch.cat(pooled) if pooled else score
    sinks = sink_count(rule, count, len(lengths))
    if sinks:
        score = score.clone()
        start = 0
        for length in lengths:
            score[start: start + min(sinks, length)] = float("inf")
            start += length
    if rule.chunk_budget == "uniform":
        picked, start = [], 0
        for length, n in zip(lengths, uniform_counts(lengths, count)):
            if n:
                picked.append(start + torch.topk(score[start: start + length], n, sorted=False).indices)
            start += length
        chosen = torch.cat(picked) if picked else score.new_zeros(0, dtype=torch.long)
    else:
        chosen = torch.topk(score, count, sorted=False).indices
    return chosen.sort().values


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def blend_prefill(model: LlamaFamilyModel, segments: list, recompute_ratio: float,
                  marks: list | None = None, prefix_kv: ChunkKV | ExactHead | None = None,
                  row_alignment: int | None = None, logits: bool = True, rule: SelectionRule = DEFAULT_RULE,
                  target_fidelity: float | None = None, probe_graphs: bool | None = None) -> BlendResult:
    """Prefill a prompt given as segments in order: token id lists (computed) and ChunkKVs (cached chunks).
    The last segment must be computed tokens (the question), whose last position gives the logits.
    ChunkKVs may live on the GPU or in (pinned) CPU memory; the latter are streamed up layer by layer.

    `rule` says how the recomputed chunk tokens are picked (chunkcache/selection.py); `recompute_ratio` is
    the share of chunk tokens recomputed, or, with `target_fidelity` (0..1], the most that may be: the
    quality-targeted mode recomputes the fewest tokens whose scores cover that share of the total score
    (the result's `covered` says what it reached). Raises ValueError for a ratio or target out of range.
    `prefix_kv`: the KV of the first segment's tokens computed alone from position 0 (the system prompt every
    request shares), which is exactly what computing them here gives: reused as is, never recomputed; or an
    ExactHead, such KV with its keys rotated already (an engine's pool: SGLang's radix-cache match, which may
    reach past the system prompt into chunks: the first segment is then those tokens), copied as it is.
    `row_alignment`: the recomputed count is nudged (by at most 5%) so the computed rows fill whole GEMM
    tiles; default GPU_ROW_ALIGNMENT on CUDA, none elsewhere. The result reports the count used.
    `marks` (CUDA only), when given, receives (stage, event) pairs for a per-stage time breakdown.
    `logits` False: the result carries the last token's hidden state instead (an engine with its own
    logits processor, such as SGLang, finishes it).
    `probe_graphs`: run the query-aware rules' probe pass from CUDA graphs (chunkcache/probe.py: the same
    numbers, without the host's launch time); None: wherever ProbeGraphs.usable says it applies."""
    run = _BlendRun(model, segments, recompute_ratio, marks, prefix_kv, row_alignment, logits, rule,
                    target_fidelity, probe_graphs)
    for layer in range(model.num_layers):
        run.layer(layer)
    return run.result()


@dataclass(frozen=True)
class BlendJob:
    """One prompt of blend_prefill_batch: blend_prefill's arguments but the model (no marks)."""

    segments: list
    recompute_ratio: float
    prefix_kv: ChunkKV | ExactHead | None = None
    logits: bool = True
    rule: SelectionRule = DEFAULT_RULE
    target_fidelity: float | None = None


@torch.no_grad()
def blend_prefill_batch(model: LlamaFamilyModel, jobs: list[BlendJob], row_alignment: int | None = None,
                        probe_graphs: bool | None = None) -> list[BlendResult]:
    """blend_prefill for several prompts, their layers run together: each prompt's probe, selection and
    attention are its own, but every layer's matrix products (the QKV projection, the output projection and the
    MLP) run once over the computed rows of all of them, so a batch of blends pays one set of launches a layer
    and multiplies larger matrices (an SGLang pass's RAG requests: sglang_plugin/prefill.py). The same numbers
    as blend_prefill of each prompt, up to the matrix products' rounding over more rows. Prompts whose rule
    selects after layer 0 (a deviation score: its layers before the selection run every row, a count known
    only there) are blended one after another. Raises ValueError as blend_prefill does."""
    runs = [_BlendRun(model, job.segments, job.recompute_ratio, None, job.prefix_kv, row_alignment, job.logits,
                      job.rule, job.target_fidelity, probe_graphs) for job in jobs]
    together = [run for run in runs if run.selects_at_layer_zero]
    for run in runs:
        if run not in together or len(together) == 1:
            for layer in range(model.num_layers):
                run.layer(layer)
    if len(together) > 1:
        for layer in range(model.num_layers):
            for run in together:
                run.loader.ready(layer)
                run.select_rows(layer)
            if layer == 0:  # the rows are fixed from here on: one matrix of them all
                rows = [run.hidden.shape[0] for run in together]
                hidden = torch.cat([run.hidden for run in together])
            qkv = model.project_qkv(layer, hidden)
            attention = torch.cat([run.attend(layer, part) for run, part in zip(together, qkv.split(rows))])
            hidden = model.finish_layer(layer, hidden, attention)
        for run, part in zip(together, hidden.split(rows)):
            run.hidden = part
    return [run.result() for run in runs]


class _BlendRun:
    """One prompt's blend between its layers (blend_prefill's state): set up by __init__ (layout, placement,
    probe, drift shift), advanced a layer at a time by `layer` (or, batched, `select_rows`, then the caller's
    projection, `attend` and the caller's finish_layer), finished by `result`."""

    def __init__(self, model: LlamaFamilyModel, segments: list, recompute_ratio: float, marks: list | None,
                 prefix_kv: ChunkKV | ExactHead | None, row_alignment: int | None, logits: bool,
                 rule: SelectionRule, target_fidelity: float | None, probe_graphs: bool | None) -> None:
        self.model, self.marks, self.rule, self.want_logits = model, marks, rule, logits
        if not 0.0 <= recompute_ratio <= 1.0:
            raise ValueError("recompute_ratio must be between 0 and 1")
        if target_fidelity is not None and not 0.0 < target_fidelity <= 1.0:
            raise ValueError("the fidelity target must be in (0, 1]")
        if target_fidelity is not None and rule.gradual > 1.0:
            raise ValueError("gradual filtering has a fixed budget: it does not take a fidelity target")
        self.target_fidelity = target_fidelity
        layout = self.layout = _layout(segments, prefix_kv)
        exact = self.exact = layout.exact
        device = model.device
        self.mark("start")
        total, chunk_tokens = layout.total, len(layout.chunk_rows)
        self.total, self.chunk_tokens = total, chunk_tokens
        if row_alignment is None:
            row_alignment = GPU_ROW_ALIGNMENT if device.type == "cuda" else 1
        self.row_alignment = row_alignment
        cap = self.cap = selected_count(chunk_tokens, recompute_ratio)
        self.count = aligned_count(cap, len(layout.other_rows), chunk_tokens, row_alignment)
        self.targeted = target_fidelity is not None and 0 < cap
        everything = self.everything = self.count == chunk_tokens and not self.targeted  # r = 1: full prefill
        token_ids, other, chunk, chunk_of = layout.upload(device)
        self.other, self.chunk = other, chunk
        chunk_bounds = (None, None)
        if rule.drift_shift and (not rule.drift_sinks or rule.drift_bins > 1):  # before the probe: no wait
            chunk_bounds = tuple(upload(torch.tensor([[start for _, start in layout.placements],
                                                      layout.chunk_lengths], dtype=torch.long), device))
        positions = torch.arange(total, device=device)
        cos, sin = self.cos, self.sin = model.rope_table(total)

        scoring = self.scoring = self.count > 0 and not everything
        query_aware = scoring and rule.query_aware
        # The first layer at which chunk rows stop being computed in full. Deviation rules run every token
        # before the selection layer (their KV depends on little context, and the selection needs every token's
        # fresh KV); attention selects before layer 0; with nothing to recompute, only the other rows run at all.
        first_cached = rule.first_selective_layer() if scoring else 0
        self.first_cached = first_cached = min(first_cached, model.num_layers)

        def placed(cache: KVCache) -> ChunkLoader:
            """The exact prefix and the chunks' KV put into `cache` (chunks streamed from CPU memory: queued)."""
            if isinstance(prefix_kv, ExactHead):  # every layer: the prefix rows are never computed
                cache.keys[:, :, :exact] = prefix_kv.keys.to(cache.keys.device, non_blocking=True)
                cache.values[:, :, :exact] = prefix_kv.values.to(cache.values.device, non_blocking=True)
            elif exact:
                place_chunk(cache, prefix_kv, 0, cos, sin)
            loader = ChunkLoader(cache, [] if everything else layout.placements, cos, sin,
                                 0 if query_aware else first_cached)
            self.mark("chunks placed")
            return loader

        self.importance = None
        probe_layers = rule.probe_layer_ids(model.num_layers)
        votes = len(layout.vote_rows)
        projections = probe_projections(model, rule.probe_weights) if query_aware else model
        if query_aware and probe_graphs is not False and ProbeGraphs.usable(model):
            graphs = ProbeGraphs.for_model(model)
            with graphs.arena_for(total, len(layout.other_rows)) as arena:
                loader = placed(arena)
                mass = graphs.probe(token_ids, other + exact, votes, total, cos, sin, loader.ready, probe_layers,
                                    projections)
                self.importance = mass[chunk + exact]
                loader.ready_all()
                cache = arena.clone(total + 64)  # the request's own cache; the arena serves the next probe
            self.mark("probe")
        else:
            cache = model.new_cache(total + 64)
            cache.positions[:total] = positions
            cache.length = total
            loader = placed(cache)
            if query_aware:
                mass = probe_eager(model, token_ids, other + exact, votes, total, cache, loader.ready, cos, sin,
                                   probe_layers, projections)
                self.importance = mass[chunk + exact]
                self.mark("probe")
        self.cache, self.loader = cache, loader
        self.covered = None

        self.shift = _DriftShift(model, cache, len(layout.chunk_lengths), chunk_of, chunk + exact, cos, sin,
                                 rule.drift_shift, *chunk_bounds,
                                 skip_first=0 if rule.drift_sinks else sink_count(rule, self.count,
                                                                                  len(layout.chunk_lengths)),
                                 bins=rule.drift_bins) if rule.drift_shift else None
        self.plan = plan_causal(total) if not exact else plan_sparse(positions[exact:], total)
        self.hidden = torch.nn.functional.embedding(token_ids[exact:], model.embed_tokens)
        # slot j holds position j
        self.slots, self.active_cos, self.active_sin = positions[exact:], cos[exact:], sin[exact:]
        self.local = torch.arange(total - exact, device=device)
        self.selected = chunk if everything else chunk[:0]
        self.narrow_at = -1  # gradual filtering: the layer at which the widened set is narrowed to the budget

    @property
    def selects_at_layer_zero(self) -> bool:
        """Whether every layer computes the same rows, chosen before layer 0 (blend_prefill_batch can run it with
        others): not a deviation rule that selects at a later layer."""
        return self.first_cached == 0 and not (self.rule.uses_deviation and self.scoring)

    def mark(self, stage: str) -> None:
        if self.marks is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((stage, event))

    def pick(self, score: torch.Tensor) -> torch.Tensor:
        """The chunk rows (local) to recompute by `score`, fixing the count in the targeted mode."""
        rule, layout = self.rule, self.layout
        if self.targeted:
            ranked = torch.sort(score, descending=True).values.tolist()  # one host sync, to size the pass
            count, self.covered = targeted_count(ranked, self.target_fidelity, self.cap)
            count = max(count, min(self.cap, sink_count(rule, self.cap, len(layout.chunk_lengths))
                                   * len(layout.chunk_lengths)))
            count = aligned_count(count, len(layout.other_rows), self.chunk_tokens, self.row_alignment)
            self.count = min(count, self.cap)
        return self.chunk[_choose(rule, score, self.count, layout.chunk_lengths)]

    def _selected(self) -> None:
        """After the selection (self.local, self.selected set): the computed rows' slots, plan and rotations."""
        exact = self.exact
        self.slots = self.local + exact
        self.plan = plan_sparse(self.slots, self.total)
        self.active_cos, self.active_sin = self.cos[self.slots], self.sin[self.slots]
        if self.shift is not None and self.scoring:
            self.shift.select(self.selected + exact, torch.searchsorted(self.local, self.selected))
        self.mark("selection")

    def select_rows(self, layer: int) -> None:
        """At the selection layer of a rule that selects before computing it (attention scores, or nothing to
        select): the computed rows become the selected chunk rows and the other rows (self.hidden narrowed to
        them). Any other layer: nothing."""
        if layer != self.first_cached or self.everything:
            return
        self.mark("layers before selection")
        if self.scoring:
            self.selected = self.pick(self.importance)
        self.local = torch.cat((self.selected, self.other)).sort().values
        self.hidden = self.hidden[self.local]
        self._selected()

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        """This layer's keys and values of the computed rows stored (with the drift correction of the others)
        and their attention: [rows, heads * head_dim]."""
        model = self.model
        if self.shift is not None and layer >= self.first_cached and not self.everything and self.scoring:
            q = self.shift.store_and_correct(layer, qkv, self.active_cos, self.active_sin, self.slots)
            return model.attend(layer, q, self.cache, self.plan)
        return model.attend_storing_kv(layer, qkv, self.active_cos, self.active_sin, self.cache, self.slots,
                                       self.plan)

    def layer(self, layer: int) -> None:
        """One layer of the blend, alone."""
        model, rule = self.model, self.rule
        self.loader.ready(layer)
        if layer == self.first_cached and not self.everything and rule.uses_deviation and self.scoring:
            self.mark("layers before selection")
            qkv = model.project_qkv(layer, self.hidden)  # every row's, for their fresh KV
            score = _fresh_deviation(model, rule, layer, qkv[self.chunk], self.cache, self.chunk + self.exact,
                                     self.cos, self.sin)
            if self.importance is not None:
                score = score * self.importance
            final = self.count
            if rule.gradual > 1.0 and layer + 1 < model.num_layers:
                self.count = min(self.chunk_tokens, math.ceil(rule.gradual * self.count))
                self.narrow_at = layer + 1
            self.selected = self.pick(score)
            self.local = torch.cat((self.selected, self.other)).sort().values
            qkv, self.hidden = qkv[self.local], self.hidden[self.local]
            if self.narrow_at > layer:
                self.count = final
            self._selected()
        elif layer == self.narrow_at:
            exact, local = self.exact, self.local
            is_chunk = torch.zeros(self.total - exact, dtype=torch.bool, device=model.device)  # gradual only
            is_chunk[self.chunk] = True
            qkv = model.project_qkv(layer, self.hidden)
            rows = torch.nonzero(is_chunk[local]).flatten()  # positions within `local` of chunk rows
            score = deviation(model.split_qkv(qkv)[2][:, rows], self.cache.values[layer][:, local[rows] + exact])
            keep_chunk = rows[torch.topk(score, self.count, sorted=False).indices]
            keep = torch.cat((keep_chunk, torch.nonzero(~is_chunk[local]).flatten())).sort().values
            self.local, qkv, self.hidden = local[keep], qkv[keep], self.hidden[keep]
            self.selected = self.local[is_chunk[self.local]]
            self.slots = self.local + exact
            self.plan = plan_sparse(self.slots, self.total)
            self.active_cos, self.active_sin = self.cos[self.slots], self.sin[self.slots]
            if self.shift is not None:
                self.shift.select(self.selected + exact, torch.searchsorted(self.local, self.selected))
        else:
            self.select_rows(layer)
            qkv = model.project_qkv(layer, self.hidden)
        attention = self.attend(layer, qkv)
        self.hidden = model.finish_layer(layer, self.hidden, attention)

    def result(self) -> BlendResult:
        model, layout = self.model, self.layout
        self.mark("layers after selection")
        last = self.hidden[-1]
        result_logits = model.logits(last[None])[0] if self.want_logits else None
        self.mark("logits")
        recomputed = self.chunk_tokens if self.everything else self.count
        if self.first_cached >= model.num_layers:  # the selection layer is past the last: everything computed
            recomputed = self.chunk_tokens
        share = compute_share(self.rule, recomputed, self.chunk_tokens, model.num_layers)
        return BlendResult(result_logits, self.cache, self.chunk_tokens, recomputed,
                           hidden=None if self.want_logits else last, compute_share=share, covered=self.covered,
                           selected_rows=self.selected + self.exact,
                           chunk_spans=[(start, kv.length) for kv, start in layout.placements],
                           chunk_drift=None if self.shift is None else self.shift.chunk_drift)
