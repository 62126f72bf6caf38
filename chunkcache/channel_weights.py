"""How much a quantisation error in each channel of a chunk's keys moves the model's output: the chunk's
`ChannelWeights` (kv.py), measured when its KV is computed (blend.py: precompute_chunk) and spent by the cachegen
encoder on its bins (codec/cachegen.py: bin_scales).

Keys are stored before RoPE. An error e in channel c of a key moves a query q's attention logit by the rotated
query's component on the rotated error; RoPE turns the channel pair (c, c + head_dim / 2) as one by the angle
between the two positions, so averaged over that angle the squared logit error is (q_c^2 + q_{c + head_dim/2}^2)
e^2 / 2: a key channel's weight is its pair's query energy. The queries that attend to a stored chunk at blend
time (the question's, the recomputed tokens') are not known when it is stored; the chunk's own tokens' queries
stand in, averaged over the tokens and over the query heads that share the KV head (grouped-query attention:
query head h reads KV head h // (heads / kv_heads)). Channels differ by orders of magnitude (the key outlier
channels of KVQuant, arXiv 2401.18079, whose sensitivity-weighted quantisation this follows).

Values carry no weights: weighting a value channel by the norm of its output projection's columns (how far an
error in it moves the layer's output) gave no gain on blended SmolLM2 (bench/results/codec-2026-11-30.md,
"Sensitivity-weighted key bins"). Key weights from the model's weights alone (the query projection's rows and the
input norm's weights, no tokens) doubled the KL where the measured ones lowered it, on the two questions tried.
"""

from __future__ import annotations

import torch

from .kv import ChannelWeights


def key_weights(queries: list[torch.Tensor], kv_heads: int) -> ChannelWeights:
    """The channel weights of a chunk's keys from its tokens' queries: per layer [heads, tokens, head_dim]
    (before RoPE; head_dim even, heads a multiple of kv_heads). Each key channel's weight is the mean over the
    tokens and the KV head's query heads of q_c^2 + q_{c +- head_dim/2}^2: float32 [layers, kv_heads, head_dim]
    on the queries' device (no host wait). ValueError for shapes that do not fit."""
    if not queries:
        raise ValueError("no layers' queries")
    heads, _, dim = queries[0].shape
    if dim % 2 or heads % kv_heads or any(q.shape[0] != heads or q.shape[2] != dim for q in queries):
        raise ValueError(f"queries of {heads} heads and head_dim {dim} do not fit {kv_heads} KV heads")
    energy = torch.stack([q.float().square().mean(dim=1) for q in queries])  # [layers, heads, head_dim]
    energy = energy + energy.roll(dim // 2, dims=-1)  # the RoPE pair's
    return ChannelWeights(energy.reshape(len(queries), kv_heads, heads // kv_heads, dim).mean(dim=2))
