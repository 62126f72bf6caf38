"""Our own forward pass for Llama-family decoders (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2).

transformers runs a whole prompt as one opaque call. Blending chunk KV needs more: explicit positions per
token, KV written into chosen slots of a request's cache, attention of any subset of tokens against every
cached slot, causal by position rather than by slot order, and access to each layer's K/V. This module
does that over the same weights (shared with the transformers model, not copied).

Conventions: one request at a time; hidden states are [tokens, hidden]; a layer's cache holds keys already
rotated to their positions, [kv_heads, capacity, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.attention import AttentionPlan, attend, plan_all, plan_causal, plan_masked, plan_sparse
from ..kernels.norm import rms_norm
from ..kernels.rope import rotate_heads

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class LayerWeights:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor


class KVCache:
    """A request's KV: per layer, keys (rotated) and values by slot, and each slot's position."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (layers, kv_heads, capacity, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.positions = torch.empty(capacity, dtype=torch.long, device=device)
        self.length = 0  # slots [0, length) hold valid KV

    @property
    def capacity(self) -> int:
        return self.positions.shape[0]

    def clone(self, capacity: int | None = None) -> "KVCache":
        """A copy of the valid slots, with room for `capacity` slots in all."""
        layers, kv_heads, _, head_dim = self.keys.shape
        copy = KVCache(layers, kv_heads, head_dim, max(capacity or self.length, self.length), self.keys.dtype,
                       self.keys.device)
        copy.keys[:, :, : self.length] = self.keys[:, :, : self.length]
        copy.values[:, :, : self.length] = self.values[:, :, : self.length]
        copy.positions[: self.length] = self.positions[: self.length]
        copy.length = self.length
        return copy

    def grow(self, needed: int) -> None:
        """Make room for `needed` slots in all, doubling so decoding appends in amortised O(1)."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.empty((*old.shape[:2], capacity, old.shape[3]), dtype=old.dtype, device=old.device)
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        positions = torch.empty(capacity, dtype=torch.long, device=self.positions.device)
        positions[: self.length] = self.positions[: self.length]
        self.positions = positions


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 like transformers, then back to the model's dtype (one fused launch on CUDA).
    return rms_norm(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, tokens, head_dim]; cos/sin: [tokens, head_dim]."""
    return rotate_heads(x, cos, sin)


class LlamaFamilyModel:
    def __init__(self, config, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not a Llama-family model we run "
                             f"({', '.join(sorted(SUPPORTED_MODEL_TYPES))})")
        self.config = config
        self.device = device
        self.dtype = dtype
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.num_layers = config.num_hidden_layers
        self.embed_tokens = weights["model.embed_tokens.weight"]
        self.final_norm = weights["model.norm.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed_tokens)  # tied embeddings reuse the input table
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                q=weights[p + "self_attn.q_proj.weight"], k=weights[p + "self_attn.k_proj.weight"],
                v=weights[p + "self_attn.v_proj.weight"], o=weights[p + "self_attn.o_proj.weight"],
                q_bias=weights.get(p + "self_attn.q_proj.bias"), k_bias=weights.get(p + "self_attn.k_proj.bias"),
                v_bias=weights.get(p + "self_attn.v_proj.bias"),
                gate=weights[p + "mlp.gate_proj.weight"], up=weights[p + "mlp.up_proj.weight"],
                down=weights[p + "mlp.down_proj.weight"], input_norm=weights[p + "input_layernorm.weight"],
                post_norm=weights[p + "post_attention_layernorm.weight"]))
        # transformers' own rotary module covers every RoPE scaling type a config can name.
        self.rotary = LlamaRotaryEmbedding(config).to(device)

    @classmethod
    def from_transformers(cls, model: torch.nn.Module) -> "LlamaFamilyModel":
        """Shares the parameters of a loaded transformers model."""
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        first = next(model.parameters())
        return cls(model.config, weights, device=first.device, dtype=first.dtype)

    @classmethod
    def random(cls, config, *, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> "LlamaFamilyModel":
        """Random weights of a config's shapes, for timing (like the dummy load format of vLLM and SGLang)."""
        generator = torch.Generator(device=device).manual_seed(seed)
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim

        def tensor(*shape: int, scale: float = 0.02) -> torch.Tensor:
            return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)

        weights = {"model.embed_tokens.weight": tensor(config.vocab_size, hidden),
                   "model.norm.weight": torch.ones(hidden, device=device, dtype=dtype)}
        if not getattr(config, "tie_word_embeddings", False):
            weights["lm_head.weight"] = tensor(config.vocab_size, hidden)
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            weights.update({
                p + "self_attn.q_proj.weight": tensor(q_out, hidden),
                p + "self_attn.k_proj.weight": tensor(kv_out, hidden),
                p + "self_attn.v_proj.weight": tensor(kv_out, hidden),
                p + "self_attn.o_proj.weight": tensor(hidden, q_out),
                p + "mlp.gate_proj.weight": tensor(inter, hidden), p + "mlp.up_proj.weight": tensor(inter, hidden),
                p + "mlp.down_proj.weight": tensor(hidden, inter),
                p + "input_layernorm.weight": torch.ones(hidden, device=device, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(hidden, device=device, dtype=dtype)})
            if bias:
                weights.update({p + "self_attn.q_proj.bias": tensor(q_out), p + "self_attn.k_proj.bias": tensor(kv_out),
                                p + "self_attn.v_proj.bias": tensor(kv_out)})
        return cls(config, weights, device=torch.device(device), dtype=dtype)

    # -- pieces of a layer, public so that blending can run them on chosen tokens --------------------
    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, capacity, self.dtype, self.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for these positions: [tokens, head_dim]."""
        cos, sin = self.rotary(self.final_norm, positions[None])
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def qkv_raw(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries and keys before the position rotation, and values, of `hidden` [tokens, hidden]:
        [heads or kv_heads, tokens, head_dim]. Unrotated keys can be placed at any position later."""
        w = self.layers[layer]
        x = _rms_norm(hidden, w.input_norm, self.eps)
        tokens = x.shape[0]
        q = F.linear(x, w.q, w.q_bias).view(tokens, self.heads, self.head_dim).transpose(0, 1)
        k = F.linear(x, w.k, w.k_bias).view(tokens, self.kv_heads, self.head_dim).transpose(0, 1)
        v = F.linear(x, w.v, w.v_bias).view(tokens, self.kv_heads, self.head_dim).transpose(0, 1)
        return q, k, v

    def qkv(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated to their positions) and values of `hidden` at one layer."""
        q, k, v = self.qkv_raw(layer, hidden)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, plan: AttentionPlan) -> torch.Tensor:
        """Attention of queries [heads, tokens, head_dim] over the cache's slots as the plan says (causal by
        position). Returns [tokens, heads * head_dim]."""
        out = attend(q, cache.keys[layer], cache.values[layer], plan)
        return out.transpose(0, 1).reshape(q.shape[1], self.heads * self.head_dim)

    def finish_layer(self, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP and residual."""
        w = self.layers[layer]
        hidden = hidden + F.linear(attention, w.o)
        x = _rms_norm(hidden, w.post_norm, self.eps)
        return hidden + F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), self.lm_head).float()

    # -- whole passes ---------------------------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache,
                last_only: bool = True, raw_kv: list | None = None) -> torch.Tensor:
        """Append these tokens to the cache (in new slots) and return their logits (or the last one's).

        positions None: the tokens continue the cache, at positions equal to their slots (prefill, decode,
        a prompt after a cached prefix); this picks the fused causal kernels. With `raw_kv` (a list), each
        layer's unrotated keys and values of these tokens are appended to it (chunk-cache entries)."""
        start, count = cache.length, token_ids.shape[0]
        cache.grow(start + count)
        slots = slice(start, start + count)
        explicit = positions is not None
        if not explicit:
            positions = torch.arange(start, start + count, device=self.device)
        cache.positions[slots] = positions
        cache.length = slots.stop
        if explicit:
            plan = plan_masked(positions, cache.positions[: cache.length])
        elif start == 0:
            plan = plan_causal(count)
        elif count == 1:
            plan = plan_all(start + 1)
        else:
            plan = plan_sparse(positions, start + count)
        hidden = F.embedding(token_ids, self.embed_tokens)
        cos, sin = self.rope(positions)
        for layer in range(self.num_layers):
            q, k, v = self.qkv_raw(layer, hidden)
            if raw_kv is not None:
                raw_kv.append((k, v))
            cache.keys[layer, :, slots] = apply_rope(k, cos, sin)
            cache.values[layer, :, slots] = v
            hidden = self.finish_layer(layer, hidden, self.attend(layer, apply_rope(q, cos, sin), cache, plan))
        return self.logits(hidden[-1:] if last_only else hidden)
