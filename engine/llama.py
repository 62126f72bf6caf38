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

from ..kernels.activation import silu_and_mul
from ..kernels.attention import AttentionPlan, attend, plan_all, plan_causal, plan_masked, plan_sparse
from ..kernels.kv_copy import copy_slots
from ..kernels.norm import rms_norm
from ..kernels.rope import rope_store

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class LayerWeights:
    """One decoder layer's weights. The q, k and v projections are stacked into one matrix, and gate and up
    into another, so each is one matrix product (fewer launches, fuller GPU waves); q, k, v, gate and up are
    views into them, under the names of the checkpoint's tensors."""

    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor

    @classmethod
    def stacked(cls, weights: dict[str, torch.Tensor], prefix: str) -> "LayerWeights":
        def get(name: str) -> torch.Tensor | None:
            return weights.get(prefix + name)

        # Engines that keep them stacked already (SGLang's qkv_proj and gate_up_proj) are shared, not copied.
        qkv, qkv_bias, gate_up = get("self_attn.qkv_proj.weight"), get("self_attn.qkv_proj.bias"), \
            get("mlp.gate_up_proj.weight")
        if qkv is None:
            qkv = torch.cat([get(f"self_attn.{p}_proj.weight") for p in "qkv"])
            biases = [get(f"self_attn.{p}_proj.bias") for p in "qkv"]
            qkv_bias = None if biases[0] is None else torch.cat(biases)
        if gate_up is None:
            gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
        return cls(qkv=qkv, qkv_bias=qkv_bias, o=get("self_attn.o_proj.weight"), gate_up=gate_up,
                   down=get("mlp.down_proj.weight"), input_norm=get("input_layernorm.weight"),
                   post_norm=get("post_attention_layernorm.weight"))

    def views(self, kv_rows: int) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors (by name within the layer) as views into the stacked ones."""
        q_rows = self.qkv.shape[0] - 2 * kv_rows
        inter = self.gate_up.shape[0] // 2
        named = {"self_attn.q_proj.weight": self.qkv[:q_rows], "self_attn.k_proj.weight": self.qkv[q_rows:-kv_rows],
                 "self_attn.v_proj.weight": self.qkv[-kv_rows:], "mlp.gate_proj.weight": self.gate_up[:inter],
                 "mlp.up_proj.weight": self.gate_up[inter:]}
        if self.qkv_bias is not None:
            named.update({"self_attn.q_proj.bias": self.qkv_bias[:q_rows],
                          "self_attn.k_proj.bias": self.qkv_bias[q_rows:-kv_rows],
                          "self_attn.v_proj.bias": self.qkv_bias[-kv_rows:]})
        return named


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
        copy_slots(self.keys, copy.keys, self.length)
        copy_slots(self.values, copy.values, self.length)
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
            copy_slots(old, new, self.length)
            setattr(self, name, new)
        positions = torch.empty(capacity, dtype=torch.long, device=self.positions.device)
        positions[: self.length] = self.positions[: self.length]
        self.positions = positions


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 like transformers, then back to the model's dtype (one fused launch on CUDA).
    return rms_norm(x, weight, eps)


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
        self.layers = [LayerWeights.stacked(weights, f"model.layers.{i}.") for i in range(self.num_layers)]
        # transformers' own rotary module covers every RoPE scaling type a config can name.
        self.rotary = LlamaRotaryEmbedding(config).to(device)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_transformers(cls, model: torch.nn.Module) -> "LlamaFamilyModel":
        """Shares the parameters of a loaded transformers model."""
        weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
        first = next(model.parameters())
        ours = cls(model.config, weights, device=first.device, dtype=first.dtype)
        del weights
        # The transformers model's projections become views into our stacked weights: one copy in memory.
        for i, layer in enumerate(ours.layers):
            for name, view in layer.views(ours.kv_heads * ours.head_dim).items():
                model.get_parameter(f"model.layers.{i}.{name}").data = view
        return ours

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

    def rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..length-1 ([length, head_dim] views of a table kept by the model, grown to
        twice the longest asked for): the same numbers as rope(arange(length)) without recomputing them each
        request. Rotations that depend on the sequence length (dynamic scaling, LongRoPE) are computed for it."""
        if getattr(self.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            return self.rope(torch.arange(length, device=self.device))
        table = self._rope_table
        if table is None or table[0].shape[0] < length:
            positions = torch.arange(max(2 * length, 4096), device=self.device)
            table = self._rope_table = self.rope(positions)
        return table[0][:length], table[1][:length]

    def project_qkv(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Queries, keys (both before the position rotation, so keys can be placed at any position later) and
        values of `hidden` [tokens, hidden], side by side: [tokens, (heads + 2 kv_heads) * head_dim]."""
        w = self.layers[layer]
        return F.linear(_rms_norm(hidden, w.input_norm, self.eps), w.qkv, w.qkv_bias)

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of project_qkv's result: [heads or kv_heads, tokens, head_dim] each."""
        heads = qkv.view(qkv.shape[0], -1, self.head_dim).transpose(0, 1)
        q, k, v = heads.split([self.heads, self.kv_heads, self.kv_heads])
        return q, k, v

    def attend(self, layer: int, q: torch.Tensor, cache: KVCache, plan: AttentionPlan) -> torch.Tensor:
        """Attention of queries [heads, tokens, head_dim] over the cache's slots as the plan says (causal by
        position). Returns [tokens, heads * head_dim]."""
        out = attend(q, cache.keys[layer], cache.values[layer], plan)
        return out.transpose(0, 1).reshape(q.shape[1], self.heads * self.head_dim)

    def attend_storing_kv(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          cache: KVCache, slots: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Keys (rotated) and values of project_qkv's result written into the cache at `slots`, then attention
        of its queries (rotated) as the plan says: [tokens, heads * head_dim]."""
        q = rope_store(qkv, self.heads, cos, sin, cache.keys[layer], cache.values[layer], slots)
        return self.attend(layer, q, cache, plan)

    def finish_layer(self, layer: int, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Output projection, residual, MLP and residual (each residual added in its matrix product)."""
        w = self.layers[layer]
        hidden = torch.addmm(hidden, attention, w.o.t())
        x = _rms_norm(hidden, w.post_norm, self.eps)
        return torch.addmm(hidden, silu_and_mul(F.linear(x, w.gate_up)), w.down.t())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(hidden, self.final_norm, self.eps), self.lm_head).float()

    # -- whole passes ---------------------------------------------------------------------------------
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache,
                last_only: bool = True, raw_kv: list | None = None, logits: bool = True,
                raw_queries: list | None = None) -> torch.Tensor:
        """Append these tokens to the cache (in new slots) and return their logits (or the last one's).

        positions None: the tokens continue the cache, at positions equal to their slots (prefill, decode,
        a prompt after a cached prefix); this picks the fused causal kernels. With `raw_kv` (a list), each
        layer's unrotated keys and values of these tokens are appended to it (chunk-cache entries); with
        `raw_queries`, each layer's unrotated queries, [heads, tokens, head_dim] (the chunk's channel weights,
        chunkcache/channel_weights.py).
        `logits` False: their hidden states before the final norm instead, [tokens or 1, hidden] (an engine with
        its own logits processor, such as SGLang, finishes them)."""
        start, count = cache.length, token_ids.shape[0]
        cache.grow(start + count)
        slots = torch.arange(start, start + count, device=self.device)
        explicit = positions is not None
        if not explicit:
            positions = slots
        cache.positions[start: start + count] = positions
        cache.length = start + count
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
            qkv = self.project_qkv(layer, hidden)
            if raw_kv is not None:
                raw_kv.append(self.split_qkv(qkv)[1:])
            if raw_queries is not None:
                raw_queries.append(self.split_qkv(qkv)[0])
            attention = self.attend_storing_kv(layer, qkv, cos, sin, cache, slots, plan)
            hidden = self.finish_layer(layer, hidden, attention)
        hidden = hidden[-1:] if last_only else hidden
        return self.logits(hidden) if logits else hidden
