"""Model runners: forward passes over one request's tokens with its KV cache.

LlamaRunner runs blendgate's own forward pass (engine/llama.py) for Llama-family models, which exposes
per-layer K/V, explicit positions and masks; HFModelRunner drives transformers' model for any other
architecture. The engine relies on prefill() and decode(), and on LlamaRunner's batch_decoder() for batched
decoding (engine/decode.py) over a paged KV pool that its prefills' KV is copied into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode import BatchDecoder
from .kv_pool import blocks_for
from .llama import SUPPORTED_MODEL_TYPES, LlamaFamilyModel
from .paged_kv import PagedKVPool
from .prefill_report import PrefillReport
from .prompt import Prompt
from .weights import LoadedModel


@dataclass
class KVState:
    """A running request's KV cache, opaque to the scheduler."""

    cache: object
    length: int
    report: PrefillReport | None = None  # what the prefill did, for the response's blendgate object


class HFModelRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = loaded.device

    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState]:
        """Run the prompt; returns the last position's logits [vocab] and the request's KV state."""
        from transformers import DynamicCache

        ids = torch.tensor([prompt.token_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], KVState(cache=out.past_key_values, length=len(prompt))

    def decode(self, token_id: int, state: KVState) -> torch.Tensor:
        """Feed one generated token; returns the next position's logits [vocab]."""
        ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        state.length += 1
        return out.logits[0, -1]



    def warm_step(self, busy: bool) -> bool:
        """Background work between the engine's steps: none here."""
        return False
class LlamaRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model = LlamaFamilyModel.from_transformers(loaded.model)
        self.device = loaded.device

    def prefill(self, prompt: Prompt) -> tuple[torch.Tensor, KVState]:
        ids = torch.tensor(prompt.token_ids, device=self.device)
        cache = self.model.new_cache(len(prompt) + 64)
        logits = self.model.forward(ids, None, cache)
        return logits[-1], KVState(cache=cache, length=len(prompt))

    def decode(self, token_id: int, state: KVState) -> torch.Tensor:
        """One request's next token on its own KVCache (the one-request path: tests, bench/decode.py)."""
        ids = torch.tensor([token_id], device=self.device)
        logits = self.model.forward(ids, None, state.cache)
        state.length += 1
        return logits[-1]


    def warm_step(self, busy: bool) -> bool:
        """Background work between the engine's steps: none here."""
        return False
    @property
    def kv_token_bytes(self) -> int:
        model = self.model
        return 2 * model.num_layers * model.kv_heads * model.head_dim * model.dtype.itemsize

    def batch_decoder(self, num_blocks: int, rows: int, max_context_tokens: int) -> BatchDecoder:
        """A batched decoder over a new paged pool of `num_blocks` blocks for `rows` requests of at most
        `max_context_tokens` tokens each (the engine's max_running and context)."""
        pool = PagedKVPool(self.model, num_blocks, rows, blocks_for(max_context_tokens))
        return BatchDecoder(self.model, pool, rows, max_context_tokens)


def make_runner(loaded: LoadedModel) -> LlamaRunner | HFModelRunner:
    """Our own runner where the architecture is one we implement, transformers' otherwise."""
    if loaded.model.config.model_type in SUPPORTED_MODEL_TYPES:
        return LlamaRunner(loaded)
    return HFModelRunner(loaded)
