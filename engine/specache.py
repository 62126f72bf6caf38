"""SpeCache's decode step (arXiv 2503.16163): long requests decode over a small GPU budget of their KV, the full
KV in host memory, the pairs each step reads chosen by low-bit keys and prefetched a step ahead.

A request is admitted with its finished prefill's KVCache (plain, prefix-cached or blended alike): its KV is
copied to host memory (kv_offload.HostKV), its keys quantised to 1 or 2 bits on the device
(kv_offload.LowBitKeys), and its pool allocation (the budget's slots, not its context) laid out as
[sinks | recent window (a ring) | top-k], per layer and KV head. A decode step, per layer:

1. the batch's QKV projection; each new key and value goes to its request's ring slot (rope_store);
2. the policy (specache_policy.RequestBudget.select) says what the step reads: the sinks, the recent window,
   and the candidates between them: all of them while they fit the top-k slots, else the top-k per KV head
   by the query's scores against the low-bit keys (kernels/lowbit_keys.score: the largest over the KV head's
   query heads, so one choice serves the whole GQA group);
3. the wanted pairs that are not resident (not prefetched) are copied from the host into top-k slots that hold
   pairs no longer wanted (kernels/residency.py: one launch a layer marks the hits, picks the free slots,
   copies the misses' pairs from the pinned host memory by index and updates the residency table and counts);
4. decode attention over the budget's first `pairs` slots (kernels/decode_attention.py over the request's
   block-table row: attention does not depend on the order of the pairs, the keys are rotated already);
5. the next step's top-k is predicted from this step's query (its scores over the next step's candidates)
   and made resident (SpeCache's speculative prefetch) on a side stream on CUDA, once this layer's attention
   has read the slots it replaces: the copies overlap the rest of the step; the next step counts how many
   of its wanted pairs were there (PrefetchStats).

After the layers, each request's new pair goes to the host tier (all layers in one copy), and a completed
group of positions becomes low-bit keys (from the recent window, on the device). With a budget that holds the
whole context every step reads every pair, which is full-KV decoding.

The step is eager (no CUDA graphs: the policy's selection is plain Python per step), but on CUDA it never
waits for the device: its inputs go up in one asynchronous copy, the top-k, the misses, the residency table
and the prefetch counts stay on the device (read back only when `OffloadedRequest.stats` is asked for), and
the pairs move in kernels, so the host queues the next layers while the device works. The caller's read of
the logits is the step's one wait.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..kernels.decode_attention import decode_attention
from ..kernels.lowbit_keys import score
from ..kernels.residency import ResidencyScratch, make_resident
from ..kernels.rope import rope_store
from .batch import DecodeBatch
from .kv_offload import HostKV, LowBitKeys
from .kv_pool import PAGE_SIZE, BlockAllocation, KVPoolError
from .llama import KVCache, LlamaFamilyModel
from .paged_kv import PagedKVPool
from .specache_policy import PrefetchStats, RequestBudget, SpeCacheSettings, StepSelection


@dataclass
class OffloadedRequest:
    """A request SpeCache serves, from `SpeCacheDecoder.admit` to its decode steps: its pool `allocation`
    (`budget.tokens` slots: sinks, ring, top-k), the host and low-bit tiers of its KV, and `resident`
    [layers, kv_heads, top_k] long on the device: the position each top-k slot holds (-1: none)."""

    allocation: BlockAllocation
    budget: RequestBudget
    host: HostKV
    lowbit: LowBitKeys
    resident: torch.Tensor
    slots: torch.Tensor  # [budget.tokens] long on the device: the pool slot of each budget slot
    # [hits, copied] long on the device (the step's stream): of the wanted top-k pairs, those already
    # resident, and the pairs copied to the GPU on a miss
    counts: torch.Tensor
    # [hits, copied] long on the device (the side stream) of the prefetch: its copies are the pairs copied ahead
    prefetch_counts: torch.Tensor
    wanted: int = 0  # top-k pairs the steps wanted (kv heads x top-k a layer and step)

    @property
    def length(self) -> int:
        return self.host.length

    @property
    def stats(self) -> PrefetchStats:
        """The prefetch hit rate's counts (reads the device's counters: waits for the device on CUDA, the side
        stream's prefetches included)."""
        if self.counts.is_cuda:
            torch.cuda.synchronize(self.counts.device)
        hits, copied = self.counts.tolist()
        stats = PrefetchStats()
        stats.record(self.wanted, hits, copied + int(self.prefetch_counts[1]))
        return stats

    def budget_slot(self, position: int) -> int:
        """Where the pair of a sink or recent-window position lives among the budget's slots."""
        sinks, recent = self.budget.sink_tokens, self.budget.recent_tokens
        return position if position < sinks else sinks + (position - sinks) % recent

    def gpu_bytes(self, kv_pair_bytes: int) -> int:
        """Device memory the request holds: its budget's full-precision pairs (`kv_pair_bytes` a position, all
        layers), its low-bit keys and its residency table (the decoder's residency scratch, shared by its
        requests, is not theirs)."""
        resident = self.resident.numel() * self.resident.element_size()
        return self.budget.tokens * kv_pair_bytes + self.lowbit.bytes + resident


class SpeCacheDecoder:
    """Decodes batches of OffloadedRequests over a PagedKVPool with a LlamaFamilyModel (eager, any device)."""

    def __init__(self, model: LlamaFamilyModel, pool: PagedKVPool, settings: SpeCacheSettings) -> None:
        self.model = model
        self.pool = pool
        self.settings = settings
        self.requests: dict[int, OffloadedRequest] = {}
        on_cuda = model.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(model.device) if on_cuda else None
        # Per layer, the end of the last step's prefetch for it (CUDA): that layer's next step waits for it.
        self._prefetched: dict[int, torch.cuda.Event] = {}
        # The residency kernel's scratch for the steps (this stream) and for the prefetches (the side stream),
        # shared by the requests (one at a time on each stream), as large as the largest admitted.
        self._step_scratch = self._prefetch_scratch = ResidencyScratch.empty(model.kv_heads, 0, 0, model.device)

    # -- requests ---------------------------------------------------------------------------------
    def admit(self, request_id: int, allocation: BlockAllocation, cache: KVCache,
              max_new_tokens: int) -> OffloadedRequest:
        """Offload a finished prefill's KV (instead of PagedKVPool.store): host copy, low-bit keys, the sinks
        and recent window into the budget's slots. KVPoolError when the allocation is smaller than the budget
        (the allocator reserves `settings.budget(prompt).tokens` for a SpeCache request)."""
        model, length = self.model, cache.length
        budget = self.settings.budget(length)
        if allocation.capacity < budget.tokens:
            raise KVPoolError(f"a SpeCache budget of {budget.tokens} pairs does not fit the request's "
                              f"{allocation.capacity} reserved slots")
        host = HostKV.from_cache(cache, length + max_new_tokens)
        lowbit = LowBitKeys(model.num_layers, model.kv_heads, model.head_dim, host.keys.shape[2],
                            self.settings.bits, self.settings.group, model.device)
        lowbit.append(cache.keys[:, :, : length // lowbit.group * lowbit.group])
        resident = torch.full((model.num_layers, model.kv_heads, budget.top_k), -1, dtype=torch.long,
                              device=model.device)
        slots = torch.tensor(allocation.slots(budget.tokens), dtype=torch.long, device=model.device)
        counts = torch.zeros(4, dtype=torch.long, device=model.device)
        request = OffloadedRequest(allocation, budget, host, lowbit, resident, slots, counts[:2], counts[2:])
        self._grow_scratch(host.keys.shape[2], budget.top_k)
        fixed = budget.select(length).fixed_positions()
        targets = slots[[request.budget_slot(p) for p in fixed]]
        self.pool.keys[:, :, targets] = cache.keys[:, :, fixed]
        self.pool.values[:, :, targets] = cache.values[:, :, fixed]
        self.pool.write_table(allocation)
        self.requests[request_id] = request
        return request

    def _grow_scratch(self, capacity: int, top_k: int) -> None:
        marks, free = self._step_scratch.marks, self._step_scratch.free
        capacity, top_k = max(capacity, marks.shape[1]), max(top_k, free.shape[1])
        if (capacity, top_k) != (marks.shape[1], free.shape[1]):
            if self._copy_stream is not None:  # the side stream's last prefetches may still read the old one
                torch.cuda.current_stream(self.model.device).wait_stream(self._copy_stream)
            heads, device = self.model.kv_heads, self.model.device
            self._step_scratch, self._prefetch_scratch = (ResidencyScratch.empty(heads, capacity, top_k, device)
                                                          for _ in range(2))

    def release(self, request_id: int) -> None:
        """Forget a finished request (its pool blocks go back through the allocator, as any request's)."""
        self.requests.pop(request_id, None)

    def batch(self, request_ids: list[int], token_ids: list[int]) -> DecodeBatch:
        """The next step of these requests, each feeding its last generated token."""
        requests = [self.requests[i] for i in request_ids]
        positions = [r.length for r in requests]
        for r, p in zip(requests, positions):
            if p >= r.host.keys.shape[2]:
                raise KVPoolError(f"position {p} is past the request's {r.host.keys.shape[2]} positions")
        return DecodeBatch(tuple(request_ids), tuple(token_ids), tuple(positions),
                           tuple(r.allocation.slot(r.budget_slot(p)) for r, p in zip(requests, positions)),
                           tuple(r.allocation.row for r in requests))

    # -- one step ---------------------------------------------------------------------------------
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token per request (a `batch(...)`); returns logits [batch.size, vocab] float32. On CUDA the step
        never waits for the device: its inputs go up in one asynchronous copy from pinned memory, the top-k and
        the misses stay on the device, and the pairs move by index in kernels (kernels/pair_copy.py)."""
        model, pool, device = self.model, self.pool, self.model.device
        requests = [self.requests[i] for i in batch.request_ids]
        selections = [r.budget.select(p + 1) for r, p in zip(requests, batch.positions)]
        upcoming = [r.budget.select(p + 2) for r, p in zip(requests, batch.positions)]
        inputs = torch.tensor([batch.token_ids, batch.positions, batch.slots, batch.rows,
                               [s.pairs for s in selections]], dtype=torch.long, pin_memory=device.type == "cuda")
        token_ids, positions, slots, rows, lengths = inputs.to(device, non_blocking=True)
        tables = pool.block_tables.index_select(0, rows)
        lengths = lengths.to(torch.int32)
        cos, sin = model.rope(positions)
        hidden = torch.nn.functional.embedding(token_ids, model.embed_tokens)
        for layer in range(model.num_layers):
            qkv = model.project_qkv(layer, hidden)
            q = rope_store(qkv, model.heads, cos, sin, pool.keys[layer], pool.values[layer], slots)
            if layer in self._prefetched:  # this layer's prefetch of the previous step
                torch.cuda.current_stream(device).wait_event(self._prefetched.pop(layer))
            predictions = [self._select(request, layer, q[:, i], selection, upcoming[i])
                           for i, (request, selection) in enumerate(zip(requests, selections))]
            attention = decode_attention(q.transpose(0, 1), pool.keys[layer], pool.values[layer], tables, lengths,
                                         PAGE_SIZE)
            # The prefetch replaces top-k pairs that this step's attention reads: it starts after it, on the
            # side stream, and overlaps the rest of the step (the output projection, the MLP, later layers).
            with self._side_stream():
                for request, predicted in zip(requests, predictions):
                    if predicted is not None:
                        if self._copy_stream is not None:  # made on the step's stream, read on this one
                            predicted.record_stream(self._copy_stream)
                        self._make_resident(request, layer, predicted, request.prefetch_counts,
                                            self._prefetch_scratch)
                if self._copy_stream is not None:
                    self._prefetched[layer] = self._copy_stream.record_event()
            hidden = model.finish_layer(layer, hidden, attention.reshape(batch.size, -1))
        for i, request in enumerate(requests):  # the step's pairs, all layers, to the host tier
            request.host.append(pool.keys, pool.values, slots[i: i + 1])
            self._quantise_completed_group(request)
        return model.logits(hidden)

    def _quantise_completed_group(self, request: OffloadedRequest) -> None:
        """After a step that completes a group of positions, its keys (all in the recent window, which holds
        two groups) become low-bit keys, read from the pool on the device."""
        group, end = request.lowbit.group, request.length
        if end % group or end - group < request.lowbit.length:
            return
        budget, device = request.budget, self.model.device
        positions = torch.arange(end - group, end, device=device)
        in_ring = budget.sink_tokens + (positions - budget.sink_tokens) % budget.recent_tokens
        slots = request.slots[torch.where(positions < budget.sink_tokens, positions, in_ring)]
        request.lowbit.append(self.pool.keys[:, :, slots])

    def _side_stream(self) -> contextlib.AbstractContextManager:
        if self._copy_stream is None:
            return contextlib.nullcontext()
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        return torch.cuda.stream(self._copy_stream)

    def _select(self, request: OffloadedRequest, layer: int, q: torch.Tensor, selection: StepSelection,
                upcoming: StepSelection) -> torch.Tensor | None:
        """Make this step's top-k pairs resident (counting prefetch hits); return the next step's predicted
        top-k [kv_heads, k] positions (None when it reads no candidates)."""
        scores = None
        if selection.scored or upcoming.scored:
            tokens = min(upcoming.recent_start, request.lowbit.length)
            scores = score(q, request.lowbit.layer(layer), tokens)
            scores[:, : selection.sinks] = float("-inf")
        if selection.top_k:
            wanted = self._wanted(request, selection, scores)
            request.wanted += wanted.numel()
            self._make_resident(request, layer, wanted, request.counts, self._step_scratch)
        return self._wanted(request, upcoming, scores) if upcoming.top_k else None

    def _wanted(self, request: OffloadedRequest, selection: StepSelection,
                scores: torch.Tensor | None) -> torch.Tensor:
        """[kv_heads, top_k] positions: every candidate, or the best-scored ones."""
        kv_heads, device = self.model.kv_heads, self.model.device
        if not selection.scored:
            return torch.arange(selection.sinks, selection.recent_start, device=device).repeat(kv_heads, 1)
        return scores[:, : selection.recent_start].topk(selection.top_k, dim=1).indices

    def _make_resident(self, request: OffloadedRequest, layer: int, wanted: torch.Tensor, counts: torch.Tensor,
                       scratch: ResidencyScratch) -> None:
        """Copy the `wanted` [kv_heads, m] positions that are not resident into top-k slots whose pairs are not
        wanted (the lowest such slots first, so a growing set stays a prefix), adding (hits, pairs copied) to
        `counts` [2] on the device: one launch (kernels/residency.py), nothing read back."""
        top_k_slots = request.slots[request.budget.sink_tokens + request.budget.recent_tokens:]
        make_resident(wanted, request.resident[layer], top_k_slots, request.host.keys[layer],
                      request.host.values[layer], self.pool.keys[layer], self.pool.values[layer], counts, scratch)
