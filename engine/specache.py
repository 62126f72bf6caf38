"""SpeCache's decode step (arXiv 2503.16163): long requests decode over a small GPU budget of their KV, the full
KV in host memory, the pairs each step reads chosen by low-bit keys and prefetched a step ahead.

A request is admitted with its finished prefill's KVCache (plain, prefix-cached or blended alike): its KV is
copied to host memory (kv_offload.HostKV), its keys quantised to 1 or 2 bits on the device
(kv_offload.LowBitKeys), and its pool allocation (the budget's slots, not its context) laid out as
[sinks | recent window (a ring) | top-k], per layer and KV head. A decode step, per layer:

1. the batch's QKV projection; each new key and value goes to its request's ring slot (rope_store);
2. the policy (specache_policy.RequestBudget.select) says what the step reads: the sinks, the recent window,
   and the candidates between them: all of them while they fit the top-k slots, else the top-k slots, of which
   the step selects its `selected` best per KV head by the query's scores against the low-bit keys
   (kernels/lowbit_keys.score: the largest over the KV head's query heads, so one choice serves the whole GQA
   group; `selected` is all the slots unless SpeCacheSettings.selected_share is below 1, when the others keep
   pairs earlier steps selected);
3. the wanted pairs that are not resident (not prefetched) are copied from the host into top-k slots that hold
   pairs no longer wanted (kernels/residency.py: one launch a layer marks the hits, picks the free slots,
   copies the misses' pairs from the pinned host memory by index and updates the residency table and counts);
4. decode attention over the budget's first `pairs` slots (kernels/decode_attention.py over the request's
   block-table row: attention does not depend on the order of the pairs, the keys are rotated already);
5. the next step's selection is predicted from this step's query (its scores over the next step's candidates)
   and made resident (SpeCache's speculative prefetch) on a side stream on CUDA, once this layer's attention
   has read the slots it replaces: the copies overlap the rest of the step; the next step counts how many
   of its wanted pairs were there (PrefetchStats).

With SpeCacheSettings.speculate, each request's step also carries a guess of the token after its own (a second
row at the next position, its pair in the budget's scratch slot), whose queries do step 5 instead (scored on
the side stream); a step whose token is the last step's guess skips steps 2 and 3 (its slots hold the guess's
choice), any other runs them as without speculation (SpeCache's speculative token, arXiv 2503.16163).

With SpeCacheSettings.select_every above 1, steps 2 to 5 run only every that many steps (`specache_policy.selects`,
one decision for the whole batch); the steps between read the budget's slots as they are: the model's kernels
and attention alone, which is cheaper than a full-KV step (attention over the budget, not the context).

A request whose first step already selects (its context is larger than its budget) is admitted with its top-k
slots filled, with the candidates just before the recent window: every slot a step reads holds a pair.

After the layers, each request's new pair goes to the host tier (all layers in one copy), and a completed
group of positions becomes low-bit keys (from the recent window, on the device). With a budget that holds the
whole context every step reads every pair, which is full-KV decoding.

In the steady state (every request of the batch scores its candidates: its context is larger than its
budget) the step runs from a CUDA graph on CUDA with half-precision weights (engine/specache_graph.py): the
same work with fixed shapes, the scores over each request's low-bit key capacity masked on the device by the
step's positions instead of sliced by the policy's Python numbers, the prefetch forked to the side stream and
joined at the end of the step. Other steps (a context still inside its budget, CPU) run eagerly; the eager
step is the reference the graph is tested against (tests/gpu/test_specache_cuda.py). On CUDA neither waits
for the device: its inputs go up in one asynchronous copy, the top-k, the misses, the residency table
and the prefetch counts stay on the device (read back only when `OffloadedRequest.stats` is asked for), and
the pairs move in kernels, so the host queues the next layers while the device works. The caller's read of
the logits is the step's one wait.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels.decode_attention import decode_attention
from ..kernels.decode_attention import triton as _triton
from ..kernels.lowbit_keys import score
from ..kernels.residency import ResidencyScratch, make_resident
from ..kernels.rope import rope_store
from .batch import DecodeBatch
from .decode import StepInputs
from .kv_offload import HostKV, LowBitKeys
from .kv_pool import PAGE_SIZE, BlockAllocation, KVPoolError
from .llama import KVCache, LlamaFamilyModel
from .paged_kv import PagedKVPool
from .specache_graph import GraphKey, SteadyStepGraphs
from .specache_policy import PrefetchStats, RequestBudget, SpeCacheSettings, StepSelection, selects

# Rotations that depend on the sequence's length read it on the host: no graphs then (as engine/decode.py).
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def top_k_with_one_more(top_values: torch.Tensor, top_indices: torch.Tensor, scores: torch.Tensor,
                        position: torch.Tensor | int) -> torch.Tensor:
    """The top-k positions [kv_heads, k] of a candidate set grown by one position, from the top-k of the set
    before it (`top_values`, `top_indices` [kv_heads, k]: a top-k over `scores` [kv_heads, positions] masked to
    the old candidates) and the new position's score: the new position takes the place of the lowest of the
    old top-k where it scores strictly higher. The same set as a second top-k over the grown set, ties apart,
    without reading the row again: a step's prefetch wants the next step's top-k, whose candidates are this
    step's and the one position leaving the recent window (SpeCache, arXiv 2503.16163).
    `position`: an int or a [] long tensor on the device (a CUDA graph's step keeps it there)."""
    heads = scores.shape[0]
    where = torch.as_tensor(position, device=scores.device).reshape(1, 1).expand(heads, 1)
    lowest, slot = top_values.min(dim=1, keepdim=True)
    kept = top_indices.gather(1, slot)
    grown = torch.where(scores.gather(1, where) > lowest, where.to(top_indices.dtype), kept)
    return top_indices.scatter(1, slot, grown)


class _Guess(NamedTuple):
    """A speculative row of a step: for the batch's row `of`, fed `token` at the next position; `confirms`:
    the request's token this step is the one the last step's guess was fed, so its prefetch holds its pairs."""

    of: int
    token: int
    confirms: bool


class _PendingGuesses:
    """A step's guesses (its speculative rows' greedy tokens [rows] long, on the device) on their way to the
    host for the next step, with the requests they guess for: copied into pinned memory behind the step, so the
    next step reads them without waiting where the caller's read of the logits already did."""

    def __init__(self, tokens: torch.Tensor, request_ids: tuple[int, ...]) -> None:
        self.request_ids = request_ids
        self._done = None
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = tokens

    def read(self) -> dict[int, int]:
        """{request id: its guess}; waits for the copy only if the caller has not waited for the step."""
        if self._done is not None and not self._done.query():
            self._done.synchronize()
        return dict(zip(self.request_ids, self._host.tolist()))

    def peek(self, request_id: int) -> int | None:
        return self.read().get(request_id)


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
    # steps since its last selecting step (SpeCacheSettings.select_every); None before its first scored step
    since_selecting: int | None = None
    # SpeCacheSettings.speculate: the token the last step's speculative row was fed (its guess of this step's
    # token; None: it had none), and how many steps had a guess and how many guesses were this step's token
    speculated: int | None = None
    guessed: int = 0
    confirmed: int = 0

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
    """Decodes batches of OffloadedRequests over a PagedKVPool with a LlamaFamilyModel (any device).

    `graphs`: None captures the steady-state step in CUDA graphs where they apply (`graphable`); False keeps
    every step eager; True insists (ValueError where they do not apply). The `graphs` attribute is then the
    decoder's SteadyStepGraphs, or None."""

    def __init__(self, model: LlamaFamilyModel, pool: PagedKVPool, settings: SpeCacheSettings,
                 graphs: bool | None = None) -> None:
        self.model = model
        self.pool = pool
        self.settings = settings
        self.requests: dict[int, OffloadedRequest] = {}
        if graphs and not self.graphable():
            raise ValueError("CUDA graphs of the SpeCache step need CUDA, half-precision weights, Triton and a "
                             "rotary embedding that does not depend on the sequence length")
        use_graphs = self.graphable() if graphs is None else graphs
        self.graphs = SteadyStepGraphs(model.device) if use_graphs else None
        self._positions: dict[int, torch.Tensor] = {}  # arange(capacity) on the device, by capacity
        on_cuda = model.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(model.device) if on_cuda else None
        # Per layer, the end of the last step's prefetch for it (CUDA): that layer's next step waits for it.
        self._prefetched: dict[int, torch.cuda.Event] = {}
        # The residency kernel's scratch for the steps (this stream) and for the prefetches (the side stream),
        # shared by the requests (one at a time on each stream), as large as the largest admitted.
        self._step_scratch = self._prefetch_scratch = ResidencyScratch.empty(model.kv_heads, 0, 0, model.device)
        # SpeCacheSettings.speculate: the last step's speculative rows' greedy tokens [rows] on the device, and
        # the requests they guess for (read at the next step, after the caller's read of the logits waited)
        self._guesses: _PendingGuesses | None = None

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
        first = budget.select(length + 1)
        if first.scored:  # every top-k slot holds a pair before the first step reads them all
            filled = torch.arange(first.recent_start - budget.top_k, first.recent_start, device=model.device)
            top_k_slots = slots[budget.top_k_slots]
            self.pool.keys[:, :, top_k_slots] = cache.keys[:, :, filled]
            self.pool.values[:, :, top_k_slots] = cache.values[:, :, filled]
            resident.copy_(filled.expand_as(resident))
        self.pool.write_table(allocation)
        self.requests[request_id] = request
        return request

    def _grow_scratch(self, capacity: int, top_k: int) -> None:
        marks, free = self._step_scratch.marks, self._step_scratch.free
        capacity, top_k = max(capacity, marks.shape[1]), max(top_k, free.shape[1])
        if (capacity, top_k) != (marks.shape[1], free.shape[1]):
            if self._copy_stream is not None:  # the side stream's last prefetches may still read the old one
                torch.cuda.current_stream(self.model.device).wait_stream(self._copy_stream)
            if self.graphs is not None:  # they read the old scratch
                self.graphs.clear()
            heads, device = self.model.kv_heads, self.model.device
            self._step_scratch, self._prefetch_scratch = (ResidencyScratch.empty(heads, capacity, top_k, device)
                                                          for _ in range(2))

    def graphable(self) -> bool:
        model = self.model
        return (model.device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
                and _triton is not None
                and getattr(model.rotary, "rope_type", "default") not in _LENGTH_DEPENDENT_ROPE)

    def release(self, request_id: int) -> None:
        """Forget a finished request (its pool blocks go back through the allocator, as any request's) and
        the step graphs of batches that held it."""
        self.requests.pop(request_id, None)
        if self.graphs is not None:
            self.graphs.drop(request_id)

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

    def guess(self, request_id: int) -> int | None:
        """The last step's guess of the token after this request's next one (SpeCacheSettings.speculate; None:
        none). Its next step confirms the prefetch if fed the token that step's guess was fed."""
        return self._guesses.peek(request_id) if self._guesses is not None else None

    def speculated(self, request_id: int) -> int | None:
        """The token the last step's guess was fed: the next step's token for which its prefetch holds."""
        return self.requests[request_id].speculated

    # -- one step ---------------------------------------------------------------------------------
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token per request (a `batch(...)`); returns logits [batch.size, vocab] float32. On CUDA the step
        never waits for the device: its inputs go up in one asynchronous copy from pinned memory, the top-k and
        the misses stay on the device, and the pairs move by index in kernels (kernels/residency.py); in the
        steady state the step is one graph replay (engine/specache_graph.py). With SpeCacheSettings.speculate
        (eager), a request's first selecting step waits for its token to feed the first guess (`_kick_off`)."""
        requests = [self.requests[i] for i in batch.request_ids]
        selections = [r.budget.select(p + 1) for r, p in zip(requests, batch.positions)]
        upcoming = [r.budget.select(p + 2) for r, p in zip(requests, batch.positions)]
        columns = [list(batch.token_ids), list(batch.positions), list(batch.slots), list(batch.rows),
                   [s.pairs for s in selections]]
        speculative, starting = self._speculative_rows(batch, requests, selections)
        for row in speculative:  # after the batch's rows: its guess, at the next position, in the scratch slot
            self._guess_columns(columns, requests[row.of], selections[row.of], batch.rows[row.of],
                                batch.positions[row.of], row.token)
        inputs = self._step_inputs(columns)
        select = selects([r.since_selecting for r, s in zip(requests, selections) if s.scored],
                         self.settings.select_every)
        for request, selection in zip(requests, selections):
            request.since_selecting = None if not selection.scored else \
                0 if select else request.since_selecting + 1
        if self.graphs is not None and all(s.scored for s in selections) and not starting:
            if speculative:  # the step's own rows select when a guess failed (one step shape for the batch)
                select = not all(row.confirms for row in speculative)
            return self._decode_steady(batch.request_ids, requests, inputs, select, bool(speculative))
        logits = self._eager_forward(inputs, requests, selections, upcoming, batch.size, select, speculative,
                                     set(starting))
        if speculative or starting:  # the next step's guesses
            guesses = [(logits[batch.size:].argmax(dim=-1), tuple(batch.request_ids[row.of] for row in speculative))]
            if starting:
                guesses.append(self._kick_off(batch, requests, selections, upcoming, starting, logits))
            self._guesses = _PendingGuesses(torch.cat([g[0] for g in guesses]),
                                            tuple(i for g in guesses for i in g[1]))
        return logits[: batch.size]

    def _eager_forward(self, inputs: torch.Tensor, requests: list[OffloadedRequest],
                       selections: list[StepSelection], upcoming: list[StepSelection], real: int, select: bool,
                       speculative: list[_Guess], own_only: set[int]) -> torch.Tensor:
        """The eager step over `inputs` [5, rows] (token, position, slot, table row, pairs read): its first
        `real` rows are the requests' tokens (0: a pass of guesses alone), then the `speculative` rows, one per
        guessing request. A request in `own_only` selects on its own and predicts nothing. Returns logits
        [rows, vocab]; the real rows' pairs go to the host tier."""
        model, pool, device = self.model, self.pool, self.model.device
        token_ids, positions, slots, rows, lengths = inputs.to(device, non_blocking=True)
        tables = pool.block_tables.index_select(0, rows)
        lengths = lengths.to(torch.int32)
        cos, sin = model.rope(positions)
        hidden = torch.nn.functional.embedding(token_ids, model.embed_tokens)
        guessing = {row.of: real + j for j, row in enumerate(speculative)}  # a request -> its guess's row
        confirmed = {row.of for row in speculative if row.confirms}
        for layer in range(model.num_layers):
            qkv = model.project_qkv(layer, hidden)
            q = rope_store(qkv, model.heads, cos, sin, pool.keys[layer], pool.values[layer], slots)
            if layer in self._prefetched:  # this layer's prefetch of the previous step
                torch.cuda.current_stream(device).wait_event(self._prefetched.pop(layer))
            # A request whose context fits its budget reads every candidate: it makes them resident each step.
            # A speculating request whose token is the last step's guess reads what that guess's queries chose.
            predictions = []
            for i, (request, selection) in enumerate(zip(requests, selections)):
                if i >= real or i in guessing or i in own_only:
                    if i < real and i not in confirmed:
                        self._select_own(request, layer, q[:, i], selection)
                    predictions.append(None)
                else:
                    predictions.append(self._select(request, layer, q[:, i], selection, upcoming[i])
                                       if select or not selection.scored else None)
            attention = decode_attention(q.transpose(0, 1), pool.keys[layer], pool.values[layer], tables, lengths,
                                         PAGE_SIZE)
            # The prefetch replaces top-k pairs that this step's attention reads: it starts after it, on the
            # side stream, and overlaps the rest of the step (the output projection, the MLP, later layers).
            with self._side_stream():
                if guessing and self._copy_stream is not None:  # made on the step's stream, read on this one
                    q.record_stream(self._copy_stream)
                for i, (request, predicted) in enumerate(zip(requests, predictions)):
                    if i in guessing:  # the next step's pairs, chosen by the guess's queries
                        predicted = self._predict(request, layer, q[:, guessing[i]], upcoming[i])
                    if predicted is not None:
                        if self._copy_stream is not None:
                            predicted.record_stream(self._copy_stream)
                        self._make_resident(request, layer, predicted, request.prefetch_counts,
                                            self._prefetch_scratch)
                if self._copy_stream is not None:
                    self._prefetched[layer] = self._copy_stream.record_event()
            hidden = model.finish_layer(layer, hidden, attention.reshape(inputs.shape[1], -1))
        for i, request in enumerate(requests[:real]):  # the step's pairs, all layers, to the host tier
            request.host.append(pool.keys, pool.values, slots[i: i + 1])
            self._quantise_completed_group(request)
        return model.logits(hidden)

    def _step_inputs(self, columns: list[list[int]]) -> torch.Tensor:
        """A step's inputs [5, rows] long (pinned on CUDA: one asynchronous copy up)."""
        return torch.tensor(columns, dtype=torch.long, pin_memory=self.model.device.type == "cuda")

    def _guess_columns(self, columns: list[list[int]], request: OffloadedRequest, selection: StepSelection,
                       row: int, position: int, token: int) -> None:
        """A speculative row's inputs: `token` at `position` + 1, its pair in the budget's scratch slot (after
        the top-k slots), reading the slots the request's own row reads and that one."""
        for column, value in zip(columns, (token, position + 1, request.allocation.slot(request.budget.tokens - 1),
                                           row, selection.pairs + 1)):
            column.append(value)

    def _kick_off(self, batch: DecodeBatch, requests: list[OffloadedRequest], selections: list[StepSelection],
                  upcoming: list[StepSelection], starting: list[int],
                  logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The first guesses of requests that start speculating this step: a pass of guesses alone, each fed
        its request's greedy token of this step (read from `logits`: a wait) at the next position, whose queries
        choose the next step's pairs. Returns their greedy tokens [len(starting)] and request ids."""
        tokens = logits[starting].argmax(dim=-1).tolist()
        columns: list[list[int]] = [[] for _ in range(5)]
        for i, token in zip(starting, tokens):
            self._guess_columns(columns, requests[i], selections[i], batch.rows[i], batch.positions[i], token)
            requests[i].speculated = token
        inputs = self._step_inputs(columns)
        picked = [requests[i] for i in starting]
        guesses = self._eager_forward(inputs, picked, [selections[i] for i in starting],
                                      [upcoming[i] for i in starting], 0, True,
                                      [_Guess(j, t, False) for j, t in enumerate(tokens)], set())
        return guesses.argmax(dim=-1), tuple(batch.request_ids[i] for i in starting)

    def _speculative_rows(self, batch: DecodeBatch, requests: list[OffloadedRequest],
                          selections: list[StepSelection]) -> tuple[list[_Guess], list[int]]:
        """The step's speculative rows (SpeCacheSettings.speculate), one per selecting request that has a guess:
        fed the last step's guess of the token after this step's (its speculative row's greedy token),
        confirming the prefetch when this step's token is the one the last step's guess was fed; and the
        selecting requests without one (their first selecting step: `_kick_off`). Counts the guesses
        (OffloadedRequest.guessed, .confirmed)."""
        guesses: dict[int, int] = {}
        if self._guesses is not None:
            guesses = self._guesses.read()
            self._guesses = None
        rows, starting = [], []
        for i, (request_id, request, selection) in enumerate(zip(batch.request_ids, requests, selections)):
            if not (self.settings.speculate and selection.scored):
                request.speculated = None
                continue
            if request_id not in guesses:
                request.speculated = None
                starting.append(i)
                continue
            token = batch.token_ids[i]
            confirms = request.speculated == token
            request.guessed += 1
            request.confirmed += confirms
            request.speculated = guesses[request_id]
            rows.append(_Guess(i, guesses[request_id], confirms))
        return rows, starting

    def _select_own(self, request: OffloadedRequest, layer: int, q: torch.Tensor, selection: StepSelection) -> None:
        """Make this step's own selection resident (a speculating request whose token was not the guess)."""
        wanted = self._predict(request, layer, q, selection)
        request.wanted += wanted.numel()
        self._make_resident(request, layer, wanted, request.counts, self._step_scratch)

    def _predict(self, request: OffloadedRequest, layer: int, q: torch.Tensor,
                 selection: StepSelection) -> torch.Tensor:
        """`selection`'s top-k [kv_heads, selected] positions by a query `q` [heads, head_dim]'s scores over
        its candidates (a guess's query: the next step's selection)."""
        scores = score(q, request.lowbit.layer(layer), min(selection.recent_start, request.lowbit.length))
        scores[:, : selection.sinks] = float("-inf")
        return self._wanted(selection, scores)[0]

    def _decode_steady(self, request_ids: tuple[int, ...], requests: list[OffloadedRequest],
                       inputs: torch.Tensor, select: bool, guessing: bool) -> torch.Tensor:
        """A steady step from the batch's graph (captured after its first steady step, which runs eagerly; each
        GraphKey is a graph of its own), and the host's bookkeeping the graph leaves out. Returns the graph's
        logits buffer [batch, vocab] (the requests' rows)."""
        if self._prefetched:  # an eager step's prefetches still pending on the side stream
            torch.cuda.current_stream(self.model.device).wait_stream(self._copy_stream)
            self._prefetched.clear()
        logits = self.graphs.run(GraphKey(request_ids, select, guessing), inputs,
                                 lambda step: self._steady_forward(step, requests, select, guessing))
        model, n = self.model, len(requests)
        for request in requests:
            request.wanted += model.num_layers * model.kv_heads * request.budget.selected if select else 0
            request.host.advance()
            self._quantise_completed_group(request)
        if guessing:  # the next step's guesses
            self._guesses = _PendingGuesses(logits[n:].argmax(dim=-1), request_ids)
        return logits[:n]

    def _steady_forward(self, inputs: StepInputs, requests: list[OffloadedRequest], select: bool,
                        guessing: bool = False) -> torch.Tensor:
        """The steady step's device work (no host-side effects, so a graph can replay it): as `decode`, with the
        candidates masked on the device and the prefetch joined back at the end; without `select`, attention
        over the slots as they are. `guessing`: `inputs` holds a speculative row per request after the
        requests' rows (SpeCacheSettings.speculate), whose queries choose the prefetch, scored on the side
        stream; `select` then makes the requests' own selections resident first. Returns logits [rows, vocab]."""
        model, pool, device = self.model, self.pool, self.model.device
        n = len(requests)
        tables = pool.block_tables.index_select(0, inputs.rows)
        lengths = inputs.lengths.to(torch.int32)
        cos, sin = model.rope(inputs.positions)
        hidden = torch.nn.functional.embedding(inputs.token_ids, model.embed_tokens)
        held = []  # what the side stream reads, held until it is joined
        for layer in range(model.num_layers):
            qkv = model.project_qkv(layer, hidden)
            q = rope_store(qkv, model.heads, cos, sin, pool.keys[layer], pool.values[layer], inputs.slots)
            predicted = []
            if select and guessing:
                for i, request in enumerate(requests):
                    top = self._steady_top_k(request, layer, q[:, i], inputs.positions[i])[0]
                    self._make_resident(request, layer, top.indices, request.counts, self._step_scratch)
            elif select:
                predicted = [self._steady_select(request, layer, q[:, i], inputs.positions[i])
                             for i, request in enumerate(requests)]
            attention = decode_attention(q.transpose(0, 1), pool.keys[layer], pool.values[layer], tables, lengths,
                                         PAGE_SIZE)
            if guessing:
                with self._side_stream():
                    for i, request in enumerate(requests):
                        top = self._steady_top_k(request, layer, q[:, n + i], inputs.positions[n + i])[0]
                        self._make_resident(request, layer, top.indices, request.prefetch_counts,
                                            self._prefetch_scratch)
                held.append(q)
            elif predicted:
                with self._side_stream():
                    for request, upcoming in zip(requests, predicted):
                        self._make_resident(request, layer, upcoming, request.prefetch_counts,
                                            self._prefetch_scratch)
            held += predicted
            hidden = model.finish_layer(layer, hidden, attention.reshape(inputs.token_ids.shape[0], -1))
        if self._copy_stream is not None and (select or guessing):
            torch.cuda.current_stream(device).wait_stream(self._copy_stream)
        for i, request in enumerate(requests):  # the step's pairs, all layers, to the host tier
            request.host.write(pool.keys, pool.values, inputs.slots[i: i + 1], inputs.positions[i: i + 1])
        return model.logits(hidden)

    def _steady_top_k(self, request: OffloadedRequest, layer: int, q: torch.Tensor,
                      position: torch.Tensor) -> tuple[torch.return_types.topk, torch.Tensor, torch.Tensor]:
        """The top-k (values, indices [kv_heads, selected]) of a query at `position` ([] long on the device) over
        its candidates [sinks, recent_start = position + 1 - recent_tokens), scored over the low-bit keys' whole
        capacity and masked on the device (no position past them is quantised yet: the recent window holds two
        groups); with the scores [kv_heads, capacity] and recent_start."""
        budget, lowbit = request.budget, request.lowbit.layer(layer)
        scores = score(q, lowbit)
        capacity = scores.shape[1]
        if capacity not in self._positions:
            self._positions[capacity] = torch.arange(capacity, device=self.model.device)
        positions = self._positions[capacity]
        recent_start = position + 1 - budget.recent_tokens
        candidate = positions >= budget.sink_tokens
        wanted = scores.masked_fill(~(candidate & (positions < recent_start)), float("-inf"))
        return wanted.topk(budget.selected, dim=1), scores, recent_start

    def _steady_select(self, request: OffloadedRequest, layer: int, q: torch.Tensor,
                       position: torch.Tensor) -> torch.Tensor:
        """`_select` of a steady step at `position` ([] long on the device): this step's top-k made resident.
        Returns the next step's selection [kv_heads, selected] (this one's grown by the position leaving the
        recent window)."""
        top, scores, recent_start = self._steady_top_k(request, layer, q, position)
        self._make_resident(request, layer, top.indices, request.counts, self._step_scratch)
        return top_k_with_one_more(top.values, top.indices, scores, recent_start)  # the next step's

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
        """Make this step's selected pairs resident (counting prefetch hits); return the next step's predicted
        selection [kv_heads, k] positions (None when it reads no candidates)."""
        scores = None
        if selection.scored or upcoming.scored:
            tokens = min(upcoming.recent_start, request.lowbit.length)
            scores = score(q, request.lowbit.layer(layer), tokens)
            scores[:, : selection.sinks] = float("-inf")
        wanted = top_scores = None
        if selection.top_k:
            wanted, top_scores = self._wanted(selection, scores)
            request.wanted += wanted.numel()
            self._make_resident(request, layer, wanted, request.counts, self._step_scratch)
        if not upcoming.top_k:
            return None
        if top_scores is not None and upcoming.scored and upcoming.selected == selection.selected \
                and upcoming.recent_start == selection.recent_start + 1 and selection.recent_start < scores.shape[1]:
            # The next step's candidates are this step's and one more (as the captured step's always are).
            return top_k_with_one_more(top_scores, wanted, scores, selection.recent_start)
        return self._wanted(upcoming, scores)[0]

    def _wanted(self, selection: StepSelection,
                scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[kv_heads, k] positions and their scores: every candidate (no scores), or the `selected`
        best-scored ones."""
        if not selection.scored:
            positions = torch.arange(selection.sinks, selection.recent_start, device=self.model.device)
            return positions.repeat(self.model.kv_heads, 1), None
        top = scores[:, : selection.recent_start].topk(selection.selected, dim=1)
        return top.indices, top.values

    def _make_resident(self, request: OffloadedRequest, layer: int, wanted: torch.Tensor, counts: torch.Tensor,
                       scratch: ResidencyScratch) -> None:
        """Copy the `wanted` [kv_heads, m] positions that are not resident into top-k slots whose pairs are not
        wanted (the lowest such slots first, so a growing set stays a prefix), adding (hits, pairs copied) to
        `counts` [2] on the device: one launch (kernels/residency.py), nothing read back."""
        top_k_slots = request.slots[request.budget.top_k_slots]
        make_resident(wanted, request.resident[layer], top_k_slots, request.host.keys[layer],
                      request.host.values[layer], self.pool.keys[layer], self.pool.values[layer], counts, scratch)
