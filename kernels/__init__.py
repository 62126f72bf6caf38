"""GPU pieces of blending, each with a PyTorch reference that also serves on the CPU.

- attention.py: attention of a request's query tokens over its KV cache, causal by position;
- sparse_attention.py: the Triton kernel behind attention.py's sparse shape;
- decode_attention.py: flash-decoding attention of one query per request over a paged KV pool (the batched
  decode, engine/decode.py);
- rope.py: chunk KV placed into a request's cache with its keys rotated to their new positions, and the
  rotary embedding of a layer's queries and keys with the keys and values stored into the cache;
- norm.py: RMSNorm;
- activation.py: SwiGLU's silu(gate) * up;
- fp8.py: FP8 (e4m3) products of weight-bound passes (the probe pass's): weights quantised per output channel,
  rows per row (alone, or fused with RMSNorm, a residual add and RMSNorm, or SwiGLU), torch._scaled_mm on GPUs
  with e4m3, an emulation with the same rounding elsewhere;
- selection.py: the KV-deviation score of each token and the choice of tokens to recompute;
- rans.py: the cachegen codec's entropy decoding (interleaved rANS) fused with its dequantisation, with a
  numpy reference;
- lowbit_keys.py: SpeCache's 1- or 2-bit keys (groups of 32 or 64 tokens) and a decode query's scores
  against them;
- pair_copy.py: SpeCache's copies of KV pairs by index between pinned host memory and the pool;
- residency.py: SpeCache's residency update of a layer (hits, free slots, the misses' pairs from pinned host
  memory, the table and the counts) in one launch.

Installed as `blendgate.kernels` (a bare `kernels` would shadow Hugging Face's package of that name).
"""
