"""The model runner: forward passes over one request's tokens with its KV cache.

For now it drives transformers' own model; the chunk-cache work replaces it with a runner that exposes
per-layer K/V, explicit positions and masks. The engine only relies on prefill() and decode().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import LoadedModel


@dataclass
class KVState:
    """A running request's KV cache, opaque to the scheduler."""

    cache: object
    length: int


class HFModelRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.device = loaded.device

    def prefill(self, token_ids: list[int]) -> tuple[torch.Tensor, KVState]:
        """Run the prompt; returns the last position's logits [vocab] and the request's KV state."""
        from transformers import DynamicCache

        ids = torch.tensor([token_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], KVState(cache=out.past_key_values, length=len(token_ids))

    def decode(self, token_id: int, state: KVState) -> torch.Tensor:
        """Feed one generated token; returns the next position's logits [vocab]."""
        ids = torch.tensor([[token_id]], device=self.device)
        out = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True)
        state.cache = out.past_key_values
        state.length += 1
        return out.logits[0, -1]
