"""Request schema of the chat endpoint: OpenAI's fields plus blendgate's own extension fields.

blendgate's options (`rag`, `documents`, `blend`, `cache`) arrive as extra top-level fields, which
is what the openai client sends for `extra_body`. Other unknown fields are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..retriever import defaults as retrieval_defaults

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# OpenAI chat parameters that an upstream provider may understand; only these are forwarded through litellm.
OPENAI_CHAT_PARAMS = (
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "n",
    "presence_penalty", "response_format", "seed", "stop", "temperature", "top_p", "tools", "tool_choice",
    "parallel_tool_calls", "user", "reasoning_effort", "metadata", "modalities", "audio", "prediction",
    "service_tier", "store", "web_search_options", "verbosity",
)

# Fields of a request that the semantic-cache key leaves out, and why: the model, the namespace and the messages
# enter the key on their own (the last message as the question's embedding); `cache` only steers the cache.
# The rest are shown not to change the answer's text: how it is delivered (`stream`, `stream_options`), whom
# it is for (`user`, `metadata`: OpenAI's end-user id and tags), whether the provider keeps a copy (`store`)
# and the latency tier it is served at (`service_tier`, the same model). Every other field a client sets,
# forwarded to a backend or one of blendgate's own, is in the key (ChatCompletionRequest.answer_params).
KEYED_SEPARATELY = frozenset({"model", "messages", "cache"})
ANSWER_NEUTRAL_PARAMS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused by the caller first."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type == "text")

    def non_text_parts(self) -> list[str]:
        if isinstance(self.content, list):
            return [part.type for part in self.content if part.type != "text"]
        return []


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class RagOptions(_Options):
    """Retrieval-augmented generation over an ingested collection (served from the retrieval issue on)."""

    collection: str = Field(min_length=1)
    top_k: int = Field(retrieval_defaults.TOP_K, ge=1, le=100)


class Document(_Options):
    text: str
    id: str | None = None
    source: str | None = None


class BlendOptions(_Options):
    """How a RAG prompt is prefilled on the local engine (chunk-caches and CacheBlend)."""

    mode: Literal["full_prefill", "prefix", "reuse", "blend"] | None = None
    recompute_ratio: float | None = Field(None, ge=0.0, le=1.0)
    # The quality-targeted mode: the fidelity wanted, recompute_ratio then being the most spent.
    fidelity_target: float | None = Field(None, gt=0.0, le=1.0)


class CacheOptions(_Options):
    """Semantic-cache controls, in LiteLLM's `cache` convention."""

    ttl: float | None = Field(None, gt=0, allow_inf_nan=False)
    no_cache: bool = Field(False, alias="no-cache")
    no_store: bool = Field(False, alias="no-store")
    # Accept a cached answer only if it is at most this many seconds old.
    s_maxage: float | None = Field(None, ge=0, alias="s-maxage", allow_inf_nan=False)
    namespace: str | None = Field(None, min_length=1)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

    # The RAG prompt's parts, set by the gateway (never by the client) when the request uses RAG.
    _rag_prompt: Any = PrivateAttr(default=None)

    # blendgate's extension fields.
    rag: RagOptions | None = None
    documents: list[str | Document] | None = None
    blend: BlendOptions | None = None
    cache: CacheOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("n > 1 is not supported; send one request per completion")
        return n

    @property
    def stop_sequences(self) -> list[str]:
        return list(self.stop or [])  # normalised to a list by the validator

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def answer_params(self) -> dict[str, Any]:
        """Every field the client set that may change the answer (JSON values by field name): all of them but
        KEYED_SEPARATELY and ANSWER_NEUTRAL_PARAMS, so a parameter the gateway forwards but has never heard
        of is part of the semantic-cache key rather than served an answer made without it."""
        data = self.model_dump(mode="json", exclude_unset=True, by_alias=True)
        return {k: v for k, v in data.items() if k not in KEYED_SEPARATELY and k not in ANSWER_NEUTRAL_PARAMS}

    def openai_params(self) -> dict[str, Any]:
        """The OpenAI parameters the client set, for forwarding upstream."""
        data = self.model_dump(exclude_unset=True, by_alias=True)
        extra = self.model_extra or {}
        params = {k: data[k] for k in OPENAI_CHAT_PARAMS if k in data}
        params.update({k: extra[k] for k in OPENAI_CHAT_PARAMS if k in extra})
        return params


class RetrieveRequest(_Options):
    collection: str = Field(min_length=1)
    query: str = Field(min_length=1)
    top_k: int = Field(retrieval_defaults.TOP_K, ge=1, le=100)


class IngestDocument(_Options):
    text: str = Field(min_length=1)
    source: str | None = None
    id: str | None = None


class IngestRequest(_Options):
    documents: list[IngestDocument] = Field(min_length=1)


class FalseHitReport(_Options):
    """A client's report that a cached answer was wrong: the entry id from a hit's blendgate.semantic_cache."""

    entry_id: str = Field(min_length=1)


class InvalidateRequest(_Options):
    """Which semantic-cache entries an operator drops: one or more selectors, all of which an entry must match."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    # Absent, not null: the schema types each as a string (None is only the "not given" default).
    entry_id: str = Field(None, min_length=1)
    collection: str = Field(None, min_length=1)
    category: str = Field(None, min_length=1)
    tenant: str = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_selector(self) -> "InvalidateRequest":
        if not self.selectors():
            raise ValueError("give one or more of entry_id, collection, category, tenant")
        return self

    def selectors(self) -> dict[str, str]:
        return self.model_dump(exclude_none=True)
