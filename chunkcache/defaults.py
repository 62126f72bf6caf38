"""The chunk-cache's size bounds, defined once: the code's keyword defaults and the gateway's settings
(gateway/config.py: ChunkCacheSettings) both take them from here. Blending's own defaults (recompute ratio,
chunk prefix, context documents) are in engine/prompt.py, the fallback's costs in fallback.py, eviction's in
eviction.py; the KV codecs' names and levels, then the shared Redis tier's bounds, are at the end."""

# Exact prompt prefixes whose KV the "prefix" mode keeps (least recently used dropped past it).
PREFIX_ENTRIES = 16
# Chunk prefixes (system prompt and context documents) whose KV each new chunk's precompute continues.
CHUNK_PREFIX_ENTRIES = 4

# The chunk-cache entries' KV codecs (chunkcache/codec/) by name, with their number of levels (0 .. n - 1; higher:
# larger and more exact), and the default: `raw`, exact.
CODEC_LEVELS = {"raw": 1, "int8": 1, "int4": 1, "cachegen": 4}
DEFAULT_CODEC = "raw"

# The shared tier in Redis (redis_tier.py; chunk_cache.redis in the gateway's settings, BLENDGATE_SGLANG_REDIS_*
# in SGLang workers): the byte budget all replicas share, the key prefix they share it under, each call's bound,
# the circuit breaker's first backoff, and the KV bytes that may wait for the writer thread.
REDIS_BUDGET_BYTES = 8 << 30
REDIS_KEY_PREFIX = "blendgate:chunk-kv"
REDIS_TIMEOUT_S = 2.0
REDIS_RETRY_S = 1.0
REDIS_WRITE_QUEUE_BYTES = 1 << 30
# Bandwidth adaptation (adaptation.py): per chunk, fetch from the shared tier or recompute, whichever is faster.
REDIS_ADAPT = True
