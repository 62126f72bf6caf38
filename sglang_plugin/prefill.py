"""One request of an extend batch prefilled by blendgate's plugin, on blendgate's model (torch; nothing from
SGLang: worker.py reads SGLang's pool and writes the result into it).

A request the plan blends (plan.py: RequestPlan.prompt) is blended by ChunkBlender (chunk KV from the
chunk-cache store, CacheBlend). Its first `prefix_len` tokens are in SGLang's pool already: within its first
segment, which the blend computes exactly, or past it (RequestPlan.exact_head: a radix-cache match over its
system prompt and first chunks), when the blend reuses their KV, read from the pool, as its exact head and blends
the chunks after them. Either way only the KV past them is new. Any other request is computed
exactly (LlamaFamilyModel.forward) after its cached prefix, read from SGLang's pool: the same numbers as a
full prefill of the whole prompt, as SGLang's own extend computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..chunkcache.kv import ExactHead
from ..chunkcache.runner import ChunkBlender, Prefetched
from ..engine.llama import KVCache
from .plan import RequestPlan

# Layer index -> that layer's keys (rotated) and values of the request's cached prefix, [prefix, kv_heads, head_dim]
PrefixReader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PrefilledRequest:
    """One request prefilled by the plugin (prefill_request to BlendWorker.prefill, which writes it into SGLang's
    pool and hands its last hidden state to SGLang's logits processor)."""

    cache: KVCache  # the request's KV, slot = position, [0, start + new tokens) valid
    start: int  # the first position not yet in SGLang's pool (the request's prefix_len)
    last_hidden: torch.Tensor  # [hidden], the last prompt token's, before the final norm
    report: dict | None  # the prefill report's wire form (protocol.py); None: the request asked no blend

    def new_kv_layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys (rotated) and values of the tokens computed in this pass, as SGLang's pool takes
        them: [layers, tokens, kv_heads, head_dim] each, contiguous (one copy for all layers where per-layer
        copies took two launches a layer)."""
        end = self.cache.length
        return (self.cache.keys[:, :, self.start:end].transpose(1, 2).contiguous(),
                self.cache.values[:, :, self.start:end].transpose(1, 2).contiguous())

    def new_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys (rotated) and values of the tokens computed in this pass, as SGLang's pool takes
        them: [tokens, kv_heads, head_dim] each (ours are [kv_heads, slots, head_dim])."""
        end = self.cache.length
        return (self.cache.keys[layer, :, self.start:end].transpose(0, 1).contiguous(),
                self.cache.values[layer, :, self.start:end].transpose(0, 1).contiguous())


@torch.no_grad()
def prefetch_chunks(blender: ChunkBlender, requests: list[RequestPlan]) -> Prefetched:
    """The chunks every blended request of a pass will blend, found in one call (ChunkBlender.prefetch): their
    misses computed side by side, one forward pass for all the requests sharing a system prompt, where each
    request's blend computing its own took one each. Hand it to prefill_request as `known` (prefill_pass
    does)."""
    return blender.prefetch([(request.prompt, request.prefix_len if request.exact_head else 0)
                             for request in requests if request.prompt is not None])


@torch.no_grad()
def prefill_pass(blender: ChunkBlender, requests: list[RequestPlan], token_ids: list[torch.Tensor],
                 readers: list[PrefixReader | None],
                 mark: Callable[[str], None] | None = None) -> list[PrefilledRequest]:
    """Every request of a plugin pass prefilled as planned, in batch order: the chunks of all the blended ones
    found first (prefetch_chunks: their misses in one forward pass, marked "misses"), the blends then run
    together (ChunkBlender.blend_many: one set of matrix products a layer over all their computed rows), the
    other requests computed exactly one by one (prefill_request); the compute marked "prefill". `token_ids` and
    `readers`: per request, as prefill_request takes them. The same numbers as prefill_request of each, up to
    the matrix products' rounding over more rows. Raises ValueError when a prefix is to be read and no reader
    is given."""
    known = prefetch_chunks(blender, requests)
    if mark is not None:
        mark("misses")
    blended = [index for index, request in enumerate(requests) if request.prompt is not None]
    heads = []
    for index in blended:
        request, read_prefix = requests[index], readers[index]
        if request.exact_head and read_prefix is None:
            raise ValueError("a blend after a cached prefix needs its prefix's KV")
        heads.append(_exact_head(blender.model.num_layers, request.prompt.token_ids[:request.prefix_len],
                                 read_prefix) if request.exact_head else None)
    done: list[PrefilledRequest | None] = [None] * len(requests)
    outcomes = blender.blend_many([(requests[i].prompt, head) for i, head in zip(blended, heads)], logits=False,
                                  known=known) if blended else []
    for index, (result, report) in zip(blended, outcomes):
        done[index] = PrefilledRequest(result.cache, requests[index].prefix_len, result.hidden, report.as_dict())
    for index, request in enumerate(requests):
        if done[index] is None:
            done[index] = prefill_request(blender, request, token_ids[index], readers[index])
    if mark is not None:
        mark("prefill")
    return done


def prefill_request(blender: ChunkBlender, request: RequestPlan, token_ids: torch.Tensor,
                    read_prefix: PrefixReader | None,
                    known: Prefetched | None = None) -> PrefilledRequest:
    """The request prefilled as planned. `token_ids` [extend_len]: its tokens computed in this pass (SGLang's
    input_ids for it); `read_prefix`: its cached prefix's KV, needed when it is computed exactly after a prefix
    or blended after one (RequestPlan.exact_head; None otherwise); `known`: its chunks found already
    (prefetch_chunks). Raises ValueError when a prefix is to be read and no reader is given."""
    model = blender.model
    if request.prompt is not None:
        head = None
        if request.exact_head:
            if read_prefix is None:
                raise ValueError("a blend after a cached prefix needs its prefix's KV")
            head = _exact_head(model.num_layers, request.prompt.token_ids[:request.prefix_len], read_prefix)
        result, report = blender.blend(request.prompt, logits=False, head=head, known=known)
        return PrefilledRequest(result.cache, request.prefix_len, result.hidden, report.as_dict())
    cache = model.new_cache(request.prefix_len + request.extend_len)
    if request.prefix_len:
        if read_prefix is None:
            raise ValueError("a request computed after a cached prefix needs its prefix's KV")
        for layer in range(model.num_layers):
            keys, values = read_prefix(layer)
            cache.keys[layer, :, :request.prefix_len] = keys.transpose(0, 1)
            cache.values[layer, :, :request.prefix_len] = values.transpose(0, 1)
        cache.positions[:request.prefix_len] = torch.arange(request.prefix_len, device=cache.positions.device)
        cache.length = request.prefix_len
    hidden = model.forward(token_ids.long(), None, cache, logits=False)
    return PrefilledRequest(cache, request.prefix_len, hidden[0], request.report)


def _exact_head(layers: int, token_ids: list[int], read_prefix: PrefixReader) -> ExactHead:
    """The cached prefix read from SGLang's pool as an exact head: [layers, kv_heads, tokens, head_dim] each."""
    keys, values = zip(*(read_prefix(layer) for layer in range(layers)))
    return ExactHead(torch.tensor(token_ids), torch.stack(keys).transpose(1, 2), torch.stack(values).transpose(1, 2))
