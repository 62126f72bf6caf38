"""The batched decode step: one forward pass computes the next token's logits of every running request.

Each step is one token per request (a DecodeBatch, batch.py): the QKV, output and MLP projections run as
[batch, hidden] matrix products (one read of the weights for the whole batch, which is what makes decoding
many requests cheaper than one at a time: decode is bound by reading the weights), each layer's new keys and
values are written to the paged pool (paged_kv.py) at the batch's slots, and each request's query attends over
its own KV through its block-table row (kernels/decode_attention.py: flash-decoding on CUDA).

On CUDA with half-precision weights the whole step (every layer, and the logits) is captured in one CUDA graph
per batch-size bucket (1, 2, 4, 8, 16, 32, ... up to the engine's max_running), as SGLang's and vLLM's decode
is: a step costs one graph launch instead of ~15 launches a layer of host time. A batch is padded to its
bucket with rows that read and write the pool's scratch block only. Graphs read fixed addresses: the inputs
are copied into the bucket's buffers, the logits come back in its output buffer (valid until the next step).
Elsewhere (CPU, float32) the step runs eagerly, with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.decode_attention import decode_attention, num_splits
from ..kernels.decode_attention import triton as _triton
from ..kernels.graph_capture import capture
from ..kernels.rope import rope_store
from .batch import DecodeBatch
from .kv_pool import PAGE_SIZE, SCRATCH_BLOCK
from .llama import LlamaFamilyModel
from .paged_kv import PagedKVPool

# Rotations that depend on the sequence's length are computed per step, never from a table (no graphs then).
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two below max_batch, and max_batch."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch]


@dataclass
class StepInputs:
    """The device tensors one decode step reads (a captured graph's fixed buffers): `packed` [4, rows] long
    holds the token ids, positions, slots and block-table rows, so one host-to-device copy fills them all; a
    SpeCache step (specache_graph.py) adds a fifth row, the pairs each request reads (`lengths`)."""

    packed: torch.Tensor

    @property
    def token_ids(self) -> torch.Tensor:
        return self.packed[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.packed[1]

    @property
    def slots(self) -> torch.Tensor:
        return self.packed[2]

    @property
    def rows(self) -> torch.Tensor:
        return self.packed[3]

    @property
    def lengths(self) -> torch.Tensor:
        return self.packed[4]


class BatchDecoder:
    """Runs DecodeBatches of up to `max_batch` requests over a PagedKVPool with a LlamaFamilyModel.

    `decode(batch)` returns the logits [batch.size, vocab] float32 (a view of a graph's output buffer on CUDA:
    read it before the next step). `graphs`: None picks CUDA graphs where they apply (`graphable`)."""

    def __init__(self, model: LlamaFamilyModel, pool: PagedKVPool, max_batch: int, max_positions: int,
                 graphs: bool | None = None) -> None:
        self.model = model
        self.pool = pool
        self.max_batch = max_batch
        self.rope_from_table = getattr(model.rotary, "rope_type", "default") not in _LENGTH_DEPENDENT_ROPE
        if self.rope_from_table:
            # Our own reference to the table: the model may grow (reallocate) its own later.
            self.cos, self.sin = model.rope_table(max_positions)
        self.graphs = self.graphable() if graphs is None else graphs
        if self.graphs and not self.graphable():
            raise ValueError("CUDA graphs of the decode step need CUDA, half-precision weights, Triton and a "
                             "rotary embedding that does not depend on the sequence length")
        self._captured: dict[int, tuple[StepInputs, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def graphable(self) -> bool:
        model = self.model
        return (model.device.type == "cuda" and model.dtype in (torch.float16, torch.bfloat16)
                and _triton is not None and self.rope_from_table)

    # -- one step ---------------------------------------------------------------------------------
    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        if batch.size > self.max_batch:
            raise ValueError(f"a decode batch of {batch.size} requests is over this decoder's {self.max_batch}")
        if not self.graphs:
            inputs = self._inputs(batch, batch.size)
            return self._forward(inputs)
        bucket = next(size for size in buckets(self.max_batch) if size >= batch.size)
        captured = self._captured.get(bucket)
        if captured is None:
            captured = self._captured[bucket] = self._capture(bucket)
        static, graph, logits = captured
        static.packed.copy_(self._host_inputs(batch, bucket))
        graph.replay()
        return logits[: batch.size]

    def capture_all(self) -> None:
        """Capture every bucket's graph now (at start-up) rather than on a bucket's first step; the largest
        first, so the smaller ones' buffers come from memory it has already taken in the shared graph pool."""
        for bucket in reversed(buckets(self.max_batch)) if self.graphs else []:
            if bucket not in self._captured:
                self._captured[bucket] = self._capture(bucket)

    def _host_inputs(self, batch: DecodeBatch, rows: int) -> torch.Tensor:
        """[4, rows] long on the host: token ids, positions, slots, block-table rows; rows past the batch are
        padding (token 0 at position 0, written to and read from the scratch block)."""
        pad = rows - batch.size
        return torch.tensor([[*batch.token_ids, *[0] * pad], [*batch.positions, *[0] * pad],
                             [*batch.slots, *[SCRATCH_BLOCK * PAGE_SIZE] * pad],
                             [*batch.rows, *[self.pool.padding_row] * pad]], dtype=torch.long)

    def _inputs(self, batch: DecodeBatch, rows: int) -> StepInputs:
        return StepInputs(self._host_inputs(batch, rows).to(self.model.device))

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Every layer for one token per row; returns logits [rows, vocab] float32."""
        model, pool = self.model, self.pool
        rows = inputs.token_ids.shape[0]
        tables = pool.block_tables.index_select(0, inputs.rows)
        lengths = (inputs.positions + 1).to(torch.int32)
        if self.rope_from_table:
            cos, sin = self.cos.index_select(0, inputs.positions), self.sin.index_select(0, inputs.positions)
        else:
            cos, sin = model.rope(inputs.positions)
        splits = num_splits(rows, model.kv_heads)
        hidden = torch.nn.functional.embedding(inputs.token_ids, model.embed_tokens)
        attention = torch.empty((rows, model.heads, model.head_dim), dtype=model.dtype, device=model.device)
        for layer in range(model.num_layers):
            qkv = model.project_qkv(layer, hidden)
            q = rope_store(qkv, model.heads, cos, sin, pool.keys[layer], pool.values[layer], inputs.slots)
            decode_attention(q.transpose(0, 1), pool.keys[layer], pool.values[layer], tables, lengths, PAGE_SIZE,
                             out=attention, splits=splits)
            hidden = model.finish_layer(layer, hidden, attention.view(rows, -1))
        return model.logits(hidden)

    def _capture(self, bucket: int) -> tuple[StepInputs, torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.model.device
        padding = DecodeBatch((0,), (0,), (0,), (SCRATCH_BLOCK * PAGE_SIZE,), (self.pool.padding_row,))
        inputs = self._inputs(padding, bucket)
        # Warm up on a side stream (compiles the Triton kernels, sets up cuBLAS), then capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._graph_pool):
            logits = self._forward(inputs)
        return inputs, graph, logits
