"""The question's probe pass: the query-aware scores blending selects by (chunkcache/selection.py).

Before anything is recomputed, a prompt's computed non-chunk rows (segment markers and the question) run over
every chunk's cached KV for the first `layers` layers, as full reuse would, and at each layer the attention the
question's rows pay every slot is added up (kernels/selection.attention_mass; ProphetKV arXiv 2602.02579,
A3 arXiv 2511.17560). The rows' KV written here is overwritten by the blend's own pass.

A few dozen rows through every layer leave a GPU idle between the host's launches: about 15 launches a layer
cost 20.6 ms of host time on the H200 for Llama-3-8B shapes, against 3.5 ms of weight reads
(bench/results/ttft-2026-11-30.md). `ProbeGraphs` captures each layer of the pass in a CUDA graph, as SGLang
and vLLM do for decoding, with the rows' attention and the voting rows' attention mass in one pass over the
slots (kernels/probe_attention.py: split over the slots, the mass from the softmax's statistics; 98 us a layer
against 210 us for the sparse kernel and attention_mass apart), for shapes padded to buckets:

- rows: padded at the front to a multiple of ROW_BUCKET with rows at position 0 that write their KV to
  scratch slots past the prompt and vote for nothing (weight 0);
- question rows: the last multiple of VOTE_BUCKET rows vote, with weight 1 for the question's own;
- slots: attention runs over a multiple of SLOT_BUCKET slots; slots past the prompt hold positions after every
  query, so the causal mask hides them (and they hold finite numbers: the arena starts zeroed).

Graphs read and write fixed addresses, so the pass runs on one KV cache per model (the arena), which the blend
then copies into the request's own cache (a copy of the prompt's KV in one launch, kernels/kv_copy.py: 0.65 ms
for 4k tokens of Llama-3-8B on the H200 as PyTorch's strided copy, about half that as contiguous runs).
Launching the attention outside the graphs instead, on the request's own cache, measured slower: five Triton
launches a layer cost more host time (~35 us each) than the layer's GPU time.

Both passes take the projections they run a layer's matrix products with (chunkcache/probe_weights.py: the
model's own weights, or their FP8 copy that halves the weight reads); graphs are captured per projections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from cachetools import LRUCache

from ..engine.instances import InstancePerKey
from ..engine.llama import KVCache, LlamaFamilyModel
from ..kernels import probe_attention as fused
from ..kernels.attention import plan_sparse
from ..kernels.graph_capture import capture
from ..kernels.probe_attention import probe_attention
from ..kernels.rope import rope_store
from ..kernels.selection import attention_mass, causal_bias
from ..kernels.settings import kernel_settings
from .probe_weights import Projections


def probe_layer_list(layers: int | Sequence[int]) -> list[int]:
    """The layers a probe runs: `layers` as a count (the first n) or as the ascending layers themselves (a
    strided probe skips layers: the residual stream goes on unchanged past them)."""
    listed = list(range(layers)) if isinstance(layers, int) else list(layers)
    if not listed or listed != sorted(set(listed)) or listed[0] < 0:
        raise ValueError("a probe runs at least one layer, ascending, without repeats")
    return listed


def probe_eager(model: LlamaFamilyModel, ids: torch.Tensor, rows: torch.Tensor, votes: int, total: int,
                cache: KVCache, ready: Callable[[int], None], cos: torch.Tensor, sin: torch.Tensor,
                layers: int | Sequence[int], projections: Projections | None = None) -> torch.Tensor:
    """Query-aware scores, one launch at a time. ids [total] (the prompt's token ids, on the model's device);
    rows [r] long: the computed non-chunk slots, ascending, the question's `votes` rows last; `ready(layer)`
    is called before a layer reads the cache (chunks streamed from CPU memory). Returns [total] float32: the
    attention mass each slot got, summed over heads, question rows and the probe's layers (`layers`: the first
    n, or which: probe_layer_list). `projections`: the layers' matrix products (probe_weights.probe_projections;
    None: the model's own)."""
    projections = model if projections is None else projections
    first_vote = rows.shape[0] - votes
    bias = causal_bias(rows[first_vote:], total, model.heads // model.kv_heads, model.dtype)
    hidden = torch.nn.functional.embedding(ids[rows], model.embed_tokens)
    plan = plan_sparse(rows, total)
    active_cos, active_sin = cos[rows], sin[rows]
    mass = torch.zeros(total, dtype=torch.float32, device=model.device)
    listed = probe_layer_list(layers)
    for layer in listed:
        ready(layer)
        qkv = projections.project_qkv(layer, hidden)
        q = rope_store(qkv, model.heads, active_cos, active_sin, cache.keys[layer], cache.values[layer], rows)
        attention_mass(q[:, first_vote:], cache.keys[layer], rows[first_vote:], total, out=mass, bias=bias)
        if layer != listed[-1]:
            hidden = projections.finish_layer(layer, hidden, model.attend(layer, q, cache, plan))
    return mass


def sparse_attention_wanted() -> bool:
    """Whether attention of sparse queries goes to the Triton kernel (the graphs are captured around it)."""
    return kernel_settings().attention == "auto"


def _round_up(value: int, bucket: int) -> int:
    return max(bucket, -(-value // bucket) * bucket)


@dataclass
class _Inputs:
    """The fixed-address tensors one captured shape reads and writes."""

    hidden: torch.Tensor  # [rows, hidden] model dtype: the layer's input, overwritten with its output
    slots: torch.Tensor  # [rows] long: where each row's KV is written
    positions: torch.Tensor  # [rows] long: each row's position (0 for padding)
    cos: torch.Tensor  # [rows, head_dim]
    sin: torch.Tensor
    weights: torch.Tensor  # [rows] float32: 1 for the question's rows, 0 for the other rows and padding
    attention: torch.Tensor  # [rows, heads * head_dim]: the layer's attention output
    mass: torch.Tensor  # [slots] float32: the result


class ProbeGraphs:
    """The probe pass captured in CUDA graphs, one per layer and padded shape, for one model (see the module
    docstring). `for_model(model)` gives the model's instance; `usable(model)` says whether it applies (CUDA,
    half-precision weights, the Triton attention kernel). Thread-safe: one probe runs at a time per model.
    Graphs are captured per padded shape and projections (the model's weights or their FP8 copy), on one arena."""

    SLOT_BUCKET = 1024
    ROW_BUCKET = 32
    VOTE_BUCKET = 16
    SHAPES_KEPT = 16  # captured shapes kept, least recently used dropped

    def __init__(self, model: LlamaFamilyModel) -> None:
        self.model = model
        self.arena: KVCache | None = None
        # (slots, rows, votes, projections) -> the fixed inputs and one graph per layer; the least recently used
        # dropped.
        self.captured: LRUCache[tuple[int, int, int, Projections], tuple[_Inputs, list[torch.cuda.CUDAGraph]]] = \
            LRUCache(self.SHAPES_KEPT)
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()

    @staticmethod
    def usable(model: LlamaFamilyModel) -> bool:
        return (model.device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
                and fused.triton is not None and sparse_attention_wanted())

    @classmethod
    def for_model(cls, model: LlamaFamilyModel) -> "ProbeGraphs":
        return _PER_MODEL.get(model)

    def shape(self, total: int, rows: int, votes: int) -> tuple[int, int, int]:
        """(slots, rows, votes) padded to their buckets."""
        return (_round_up(total, self.SLOT_BUCKET), _round_up(rows, self.ROW_BUCKET),
                _round_up(votes, self.VOTE_BUCKET))

    @contextmanager
    def arena_for(self, total: int, rows: int) -> Iterator[KVCache]:
        """The model's arena cache, holding `total` valid slots (positions 0..total-1), for the duration of the
        block: the caller places the prompt's KV in it, probes, and copies what it keeps out before leaving."""
        slots, padded_rows, _ = self.shape(total, rows, 1)
        with self.lock:
            needed = slots + padded_rows  # padding rows write past the slots
            if self.arena is None or self.arena.capacity < needed:
                self.captured.clear()  # the graphs point at the old arena
                self.arena = None
                # A private pool lives only while a graph holds it: with every graph dropped, capturing into
                # the old handle fails inside PyTorch's allocator (an internal assert), so take a new one.
                self.pool = torch.cuda.graph_pool_handle()
                torch.cuda.empty_cache()
                arena = self.model.new_cache(max(needed, 2 * self.SLOT_BUCKET))
                arena.keys.zero_()
                arena.values.zero_()
                self.arena = arena
            arena = self.arena
            arena.positions[:total] = torch.arange(total, device=arena.positions.device)
            arena.length = total
            yield arena

    def probe(self, ids: torch.Tensor, rows: torch.Tensor, votes: int, total: int, cos: torch.Tensor,
              sin: torch.Tensor, ready: Callable[[int], None], layers: int | Sequence[int],
              projections: Projections | None = None) -> torch.Tensor:
        """As probe_eager, on the arena (call inside `arena_for`). Returns [total] float32 (a view)."""
        model = self.model
        key = (*self.shape(total, rows.shape[0], votes), model if projections is None else projections)
        slots, padded_rows, padded_votes, _ = key
        entry = self.captured.get(key)  # a lookup counts as use
        if entry is None:
            entry = self.captured[key] = self._capture(key)
        inputs, graphs = entry
        pad = padded_rows - rows.shape[0]
        device = model.device
        scratch = slots + torch.arange(pad, device=device)
        zero = torch.zeros(pad, dtype=torch.long, device=device)
        positions = torch.cat((zero, rows))
        inputs.slots.copy_(torch.cat((scratch, rows)))
        inputs.positions.copy_(positions)
        inputs.hidden.copy_(torch.nn.functional.embedding(torch.cat((ids[:1].expand(pad), ids[rows])),
                                                          model.embed_tokens))
        inputs.cos.copy_(cos[positions])
        inputs.sin.copy_(sin[positions])
        inputs.weights.zero_()[padded_rows - votes:] = 1.0
        inputs.mass.zero_()
        for layer in probe_layer_list(layers):
            ready(layer)
            graphs[layer].replay()
        return inputs.mass[:total]

    def _layer(self, inputs: _Inputs, layer: int, first_vote: int, projections: Projections) -> None:
        """One layer of the probe on the fixed inputs (what each graph holds): the rows' attention output and
        the voting rows' attention mass in one pass over the slots (kernels/probe_attention.py)."""
        model, arena = self.model, self.arena
        slots = inputs.mass.shape[0]
        qkv = projections.project_qkv(layer, inputs.hidden)
        q = rope_store(qkv, model.heads, inputs.cos, inputs.sin, arena.keys[layer], arena.values[layer],
                       inputs.slots)
        # Written as [heads, rows, head_dim] into a row-major buffer: the output projection reads it as is.
        out = inputs.attention.view(q.shape[1], model.heads, model.head_dim).transpose(0, 1)
        probe_attention(q, arena.keys[layer], arena.values[layer], inputs.positions, inputs.weights, first_vote,
                        slots, inputs.mass, out=out)
        if layer + 1 < model.num_layers:
            inputs.hidden.copy_(projections.finish_layer(layer, inputs.hidden, inputs.attention))

    def _capture(self, key: tuple[int, int, int, Projections]) -> tuple[_Inputs, list[torch.cuda.CUDAGraph]]:
        model = self.model
        slots, padded_rows, padded_votes, projections = key
        device, dtype = model.device, model.dtype
        positions = torch.zeros(padded_rows, dtype=torch.long, device=device)
        inputs = _Inputs(
            hidden=torch.zeros(padded_rows, model.embed_tokens.shape[1], dtype=dtype, device=device),
            slots=slots + torch.arange(padded_rows, device=device), positions=positions,
            cos=torch.ones(padded_rows, model.head_dim, dtype=dtype, device=device),
            sin=torch.zeros(padded_rows, model.head_dim, dtype=dtype, device=device),
            weights=torch.zeros(padded_rows, dtype=torch.float32, device=device),
            attention=torch.zeros(padded_rows, model.heads * model.head_dim, dtype=dtype, device=device),
            mass=torch.zeros(slots, dtype=torch.float32, device=device))
        # Warm up on a side stream (compiles the Triton kernels, sets up cuBLAS), then capture layer by layer.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for layer in range(model.num_layers):
                self._layer(inputs, layer, padded_rows - padded_votes, projections)
        torch.cuda.current_stream(device).wait_stream(side)
        graphs = []
        for layer in range(model.num_layers):
            graph = torch.cuda.CUDAGraph()
            with capture(graph, self.pool):
                self._layer(inputs, layer, padded_rows - padded_votes, projections)
            graphs.append(graph)
        return inputs, graphs


_PER_MODEL: InstancePerKey[LlamaFamilyModel, ProbeGraphs] = InstancePerKey(ProbeGraphs)
