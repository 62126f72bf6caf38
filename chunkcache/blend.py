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
from dataclasses import dataclass

import torch

from ..engine.llama import KVCache, LlamaFamilyModel
from ..kernels.attention import plan_causal, plan_sparse
from ..kernels.rope import place
from ..kernels.selection import select_rows

# The layer at which tokens are selected; the paper finds the deviation at an early layer predicts the
# later ones, and layer 0's KV never deviates (it depends on the token and its position only).
SELECTION_LAYER = 1


@dataclass
class ChunkKV:
    """One chunk's KV, computed with the chunk alone after `prefix_ids`; keys are not rotated."""

    token_ids: torch.Tensor  # [tokens], on the host
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim], before RoPE
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_ids.nbytes


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def precompute_chunk(model: LlamaFamilyModel, chunk_ids: list[int], prefix_ids: list[int] = ()) -> ChunkKV:
    """The chunk's KV as computed after `prefix_ids` (e.g. the system prompt), keys kept unrotated."""
    ids = torch.tensor([*prefix_ids, *chunk_ids], device=model.device)
    start = len(prefix_ids)
    raw: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.forward(ids, None, model.new_cache(ids.shape[0]), raw_kv=raw)
    keys = torch.stack([k[:, start:] for k, _ in raw])
    values = torch.stack([v[:, start:] for _, v in raw])
    return ChunkKV(token_ids=torch.tensor(list(chunk_ids)), keys=keys, values=values)


@dataclass
class BlendResult:
    logits: torch.Tensor | None  # [vocab] of the last prompt token (None when the caller asked for hidden)
    cache: KVCache  # the prompt's KV, ready for decoding
    chunk_tokens: int
    recomputed_chunk_tokens: int
    hidden: torch.Tensor | None = None  # [hidden] of the last prompt token, before the final norm

    @property
    def recompute_ratio(self) -> float:
        return self.recomputed_chunk_tokens / self.chunk_tokens if self.chunk_tokens else 0.0


# cuBLAS multiplies a multiple of 128 rows at full speed but a few rows past one up to a fifth slower per row
# (bench/gemm_rows.py on the H100: Llama-3-8B's four products take 396 us for 640 rows, 471 us for 646), and
# a blend's later layers are nearly all matrix products over the computed rows.
GPU_ROW_ALIGNMENT = 128
ALIGNMENT_SLACK = 0.05  # how far (relative) aligning may move the number of recomputed tokens


def selected_count(chunk_tokens: int, ratio: float) -> int:
    return min(chunk_tokens, math.ceil(ratio * chunk_tokens - 1e-9))


def aligned_count(count: int, other_rows: int, chunk_tokens: int, alignment: int) -> int:
    """`count` moved to the nearest value that makes the computed rows (count + other_rows) a multiple of
    `alignment`, if that moves it by at most ALIGNMENT_SLACK of itself; else `count` unchanged."""
    if alignment <= 1 or count in (0, chunk_tokens):
        return count
    aligned = round((count + other_rows) / alignment) * alignment - other_rows
    if 0 < aligned <= chunk_tokens and abs(aligned - count) <= ALIGNMENT_SLACK * count:
        return aligned
    return count


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

    Chunks already on the GPU are placed for every needed layer at once (one fused launch per chunk).
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
        for kv, start in resident:
            place_chunk(cache, kv, start, cos, sin, slice(first_layer, self.layers))
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

    def ready(self, layer: int) -> None:
        """Block the compute stream until the chunks' KV of `layer` is in place (no host wait)."""
        if self.stream is None or layer < self.first_layer:
            return
        self._issue_through(layer + self.group)
        event = self.events.pop(layer)
        if event is not self.waited:  # once per group
            torch.cuda.current_stream(self.cache.keys.device).wait_event(event)
            self.waited = event


@torch.no_grad()  # not inference_mode: callers may keep using the cache outside it
def blend_prefill(model: LlamaFamilyModel, segments: list, recompute_ratio: float,
                  marks: list | None = None, prefix_kv: ChunkKV | None = None,
                  row_alignment: int | None = None, logits: bool = True) -> BlendResult:
    """Prefill a prompt given as segments in order: token id lists (computed) and ChunkKVs (cached chunks).
    The last segment must be computed tokens (the question), whose last position gives the logits.
    ChunkKVs may live on the GPU or in (pinned) CPU memory; the latter are streamed up layer by layer.
    `prefix_kv`: the KV of the first segment's tokens computed alone from position 0 (the system prompt every
    request shares), which is exactly what computing them here gives: reused as is, never recomputed.
    `row_alignment`: the recomputed count is nudged (by at most 5%) so the computed rows fill whole GEMM
    tiles; default GPU_ROW_ALIGNMENT on CUDA, none elsewhere. The result reports the count used.
    `marks` (CUDA only), when given, receives (stage, event) pairs for a per-stage time breakdown.
    `logits` False: the result carries the last token's hidden state instead (an engine with its own
    logits processor, such as SGLang, finishes it)."""
    def mark(stage: str) -> None:
        if marks is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((stage, event))

    if not 0.0 <= recompute_ratio <= 1.0:
        raise ValueError("recompute_ratio must be between 0 and 1")
    if not segments or isinstance(segments[-1], ChunkKV) or not segments[-1]:
        raise ValueError("blending needs computed tokens (the question) after the last chunk")
    exact = 0  # leading rows whose KV is reused exactly
    if prefix_kv is not None:
        if isinstance(segments[0], ChunkKV) or list(segments[0]) != prefix_kv.token_ids.tolist():
            raise ValueError("prefix_kv must be the KV of the first segment's tokens")
        exact = prefix_kv.length
    device = model.device
    # Everything about the layout is known on the host, so the GPU never has to be waited for.
    ids, placements, chunk_rows, other_rows = [], [], [], []
    for segment in segments:
        start = len(ids)
        if isinstance(segment, ChunkKV):
            ids += segment.token_ids.tolist()
            placements.append((segment, start))
            chunk_rows += range(start, len(ids))
        else:
            ids += list(segment)
            other_rows += range(max(start, exact), len(ids))
    mark("start")
    total, chunk_tokens = len(ids), len(chunk_rows)
    if row_alignment is None:
        row_alignment = GPU_ROW_ALIGNMENT if device.type == "cuda" else 1
    count = aligned_count(selected_count(chunk_tokens, recompute_ratio), len(other_rows), chunk_tokens,
                          row_alignment)
    positions = torch.arange(total, device=device)
    cos, sin = model.rope(positions)
    cache = model.new_cache(total + 64)
    cache.positions[:total] = positions
    cache.length = total
    if exact:
        place_chunk(cache, prefix_kv, 0, cos, sin)  # every layer: the prefix rows are never computed

    # Layers before the selection layer run every token (their KV depends on little context, and the
    # selection needs every token's fresh values); with nothing to recompute, only the question runs at all.
    first_cached = SELECTION_LAYER if count else 0
    everything = count == chunk_tokens  # r = 1: full prefill, computed as such
    loader = ChunkLoader(cache, [] if everything else placements, cos, sin, first_cached)
    mark("chunks placed")
    # Row indices below are local to the computed rows, which start after the exact prefix.
    other = torch.tensor(other_rows, dtype=torch.long, device=device) - exact
    chunk = torch.tensor(chunk_rows, dtype=torch.long, device=device) - exact

    plan = plan_causal(total) if not exact else plan_sparse(positions[exact:], total)
    hidden = torch.nn.functional.embedding(torch.tensor(ids[exact:], device=device), model.embed_tokens)
    slots, active_cos, active_sin = positions[exact:], cos[exact:], sin[exact:]  # slot j holds position j
    for layer in range(model.num_layers):
        loader.ready(layer)
        if layer == first_cached and not everything:
            mark("layers before selection")
            if count:  # every row's fresh values, to find the rows whose cached values deviate most
                qkv = model.project_qkv(layer, hidden)
                fresh_values = model.split_qkv(qkv)[2]
                local = select_rows(fresh_values, cache.values[layer, :, exact:total], chunk, other, count)
                qkv, hidden = qkv[local], hidden[local]
            else:
                local = other
                hidden = hidden[local]
                qkv = model.project_qkv(layer, hidden)
            slots = local + exact
            plan = plan_sparse(slots, total)
            active_cos, active_sin = cos[slots], sin[slots]
            mark("selection")
        else:
            qkv = model.project_qkv(layer, hidden)
        attention = model.attend_storing_kv(layer, qkv, active_cos, active_sin, cache, slots, plan)
        hidden = model.finish_layer(layer, hidden, attention)
    mark("layers after selection")
    last = hidden[-1]
    result_logits = model.logits(last[None])[0] if logits else None
    mark("logits")
    recomputed = count if model.num_layers > first_cached else chunk_tokens
    return BlendResult(result_logits, cache, chunk_tokens, recomputed, hidden=None if logits else last)
