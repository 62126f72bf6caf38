"""Chunk KV caches and CacheBlend: precomputed per-chunk KV, reused at any position with selective recompute."""
