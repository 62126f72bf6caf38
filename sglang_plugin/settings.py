"""The plugin's settings, from BLENDGATE_SGLANG_* environment variables (SGLang starts its worker processes;
there is no blendgate configuration file there). Each default is the local engine's (gateway/config.py:
ChunkCacheSettings) where both have the setting, taken from the same constant.

- BLENDGATE_SGLANG_PLUGIN: 0 turns the plugin off (default on);
- BLENDGATE_SGLANG_GPU_CACHE_GB, BLENDGATE_SGLANG_CPU_CACHE_GB: the chunk-KV store's tiers (defaults 4 and 16);
- BLENDGATE_SGLANG_CPU_CACHE_PIN_TOKENS: the chunk size, in tokens, the CPU tier's memory is pinned for at
  start-up (chunkcache/tiers.py: MemoryTier.reserve): its whole budget is page-locked before the worker serves,
  in blocks that entries of chunks of more than half this size and at most this size take. Set the gateway's
  retrieval.chunk_tokens (default 256, the gateway's default); chunks outside that range are pinned as they
  come, beside the reservation. 0: no reservation (each entry pins its memory on the serving thread, until the
  tier is full);
- BLENDGATE_SGLANG_CHUNK_PREFIX: "system" or "none", as the local engine's chunk_prefix;
- BLENDGATE_SGLANG_PASS_COST_TOKENS, BLENDGATE_SGLANG_PLACEMENT_COST_TOKENS: the blend-or-full-prefill costs, as
  the local engine's pass_cost_tokens ("auto", the default: measured at start-up on the worker's GPU) and
  placement_cost_tokens;
- BLENDGATE_SGLANG_EVICTION: "lru" or "cost_aware", as the local engine's eviction;
- BLENDGATE_SGLANG_PROBE_WEIGHTS: "model" (the default), "auto" or "fp8", as the local engine's
  selection.probe_weights (auto: the probe pass reads an FP8 copy of the layer weights on GPUs with FP8
  products, about half the decoder layers' bytes in GPU memory beside SGLang's, made at the first blend: leave
  room for it in --mem-fraction-static);
- BLENDGATE_SGLANG_REDIS_URL, BLENDGATE_SGLANG_REDIS_BUDGET_GB, BLENDGATE_SGLANG_REDIS_KEY_PREFIX,
  BLENDGATE_SGLANG_REDIS_TIMEOUT_S: the shared chunk-cache tier (chunkcache/redis_tier.py), as the gateway's
  chunk_cache.redis (url, budget_bytes, key_prefix, timeout_s); off unless the URL is set. Give the gateway's
  URL and key prefix, and the workers and gateway replicas share one another's chunks;
- BLENDGATE_SGLANG_CODEC, BLENDGATE_SGLANG_CODEC_LEVEL: the shared tier's entries' KV codec (chunkcache/codec/),
  as the gateway's chunk_cache.codec (name, level): set them alike, since an entry of another codec is a miss;
- BLENDGATE_SGLANG_REDIS_ADAPT: 0 turns bandwidth adaptation off (chunkcache/adaptation.py: per chunk, recompute
  instead of fetching from the shared tier when fetching would be slower), as the gateway's
  chunk_cache.redis.adapt (default on);
- BLENDGATE_SGLANG_PROFILE: 1 times each pass the plugin takes by stage (sglang_plugin/profile.py: CUDA events,
  one host synchronisation at the pass's end) and adds the times to each blended request's report under
  "plugin_pass_ms" (default off: for benchmarks, bench/sglang_rows.py);
- BLENDGATE_SGLANG_WARM_SHARE: the most of the time (0-1, default 0.1) computing the chunks a full-prefill
  fallback left uncached may take (chunkcache/warming.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..chunkcache import defaults as chunk_cache_defaults
from ..chunkcache.eviction import DEFAULT_EVICTION, EvictionPolicyName
from ..chunkcache.fallback import DEFAULT_PLACEMENT_COST_TOKENS
from ..chunkcache.selection import DEFAULT_RULE, ProbeWeights
from ..chunkcache.warming import DEFAULT_WARM_SHARE
from ..engine.prompt import DEFAULT_CHUNK_PREFIX, ChunkPrefix
from ..retriever import defaults as retrieval_defaults

PREFIX = "BLENDGATE_SGLANG_"
GIB = 1 << 30


class PluginSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)

    plugin: bool = True
    gpu_cache_gb: float = Field(4.0, ge=0, allow_inf_nan=False)
    cpu_cache_gb: float = Field(16.0, ge=0, allow_inf_nan=False)
    cpu_cache_pin_tokens: int = Field(retrieval_defaults.CHUNK_TOKENS, ge=0)
    chunk_prefix: ChunkPrefix = DEFAULT_CHUNK_PREFIX
    # A chunk's own forward pass, in tokens computed; "auto": measured at start-up on the worker's GPU
    # (chunkcache/runner.py: ChunkBlender.calibrate).
    pass_cost_tokens: Annotated[float, Field(ge=0, allow_inf_nan=False)] | Literal["auto"] = "auto"
    placement_cost_tokens: float = Field(DEFAULT_PLACEMENT_COST_TOKENS, ge=0, allow_inf_nan=False)
    eviction: EvictionPolicyName = DEFAULT_EVICTION
    probe_weights: ProbeWeights = DEFAULT_RULE.probe_weights
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://")
    redis_budget_gb: float = Field(chunk_cache_defaults.REDIS_BUDGET_BYTES / GIB, gt=0, allow_inf_nan=False)
    redis_key_prefix: str = Field(chunk_cache_defaults.REDIS_KEY_PREFIX, min_length=1)
    redis_timeout_s: float = Field(chunk_cache_defaults.REDIS_TIMEOUT_S, gt=0, allow_inf_nan=False)
    redis_adapt: bool = chunk_cache_defaults.REDIS_ADAPT
    codec: str = chunk_cache_defaults.DEFAULT_CODEC
    codec_level: int = Field(0, ge=0)
    profile: bool = False
    warm_share: float = Field(DEFAULT_WARM_SHARE, gt=0, le=1, allow_inf_nan=False)

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        if name not in chunk_cache_defaults.CODEC_LEVELS:
            raise ValueError(f"must be one of {', '.join(chunk_cache_defaults.CODEC_LEVELS)}")
        return name

    @field_validator("codec_level")
    @classmethod
    def _known_level(cls, level: int, info: ValidationInfo) -> int:
        levels = chunk_cache_defaults.CODEC_LEVELS.get(info.data.get("codec"), 1)
        if level >= levels:
            raise ValueError(f"codec {info.data.get('codec')!r} has levels 0..{levels - 1}")
        return level

    @classmethod
    def from_env(cls) -> "PluginSettings":
        """The settings from the environment; ValueError naming each bad variable and what it must be."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(f"{PREFIX}{str(error['loc'][0]).upper()}: {error['msg']}, got {error['input']!r}"
                                 for error in exc.errors())
            raise ValueError(f"bad blendgate plugin setting: {problems}") from None

    @property
    def gpu_cache_bytes(self) -> int:
        return int(self.gpu_cache_gb * GIB)

    @property
    def cpu_cache_bytes(self) -> int:
        return int(self.cpu_cache_gb * GIB)

    @property
    def redis_budget_bytes(self) -> int:
        return int(self.redis_budget_gb * GIB)

