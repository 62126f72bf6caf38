"""Request schemas of the API: OpenAI's chat fields plus blendgate's own extension fields, and the retrieval bodies.

blendgate's options (`rag`, `documents`, `blend`, `cache`) arrive as extra top-level fields, which
is what the openai client sends for `extra_body`. Other unknown fields are accepted and ignored.

Types are strict, as OpenAI's are: "10" is not an integer, "yes" not a boolean, null not a message's text.
Every string in a body, unknown fields included, must be valid Unicode (no lone surrogates such as "\\ud800",
which JSON can spell but no tokenizer or encoder takes); a body breaking either rule is refused with 400 here,
before any layer sees it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..engine.prompt import PrefillMode
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


# The 64-bit signed range OpenAI declares for `seed`.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1
# Roles whose messages must carry content (an assistant message may have none: it made tool calls).
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


def invalid_unicode_at(value: Any, loc: tuple[str | int, ...] = ()) -> tuple[tuple[str | int, ...], str] | None:
    """Where in JSON data (dicts, lists, strings) the first string that is not valid Unicode is, and that
    string; None when every string (object keys included) encodes as UTF-8. A lone surrogate is the one
    way JSON text can hold such a string."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return loc, value
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = invalid_unicode_at(key, loc) or invalid_unicode_at(item, (*loc, str(key)))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = invalid_unicode_at(item, (*loc, index))
            if found:
                return found
    return None


def integral_numbers(value: Any) -> Any:
    """JSON data with every float that holds a whole number (64.0) as an int: JSON and JSON Schema do not tell
    64.0 from 64, so an integer field takes either; strings are never numbers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral_numbers(item) for item in value]
    return value


class _Strict(BaseModel):
    """Strict types (OpenAI's): no coercion of strings to numbers or booleans."""

    model_config = ConfigDict(strict=True)


class _Body(_Strict):
    """A whole request body: its text, every field and unknown field included, must be valid Unicode; whole
    numbers written as floats (64.0) count as integers, as JSON Schema counts them."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_unicode_at(data)
        if found is not None:
            loc, text = found
            bad = next(ord(c) for c in text if 0xD800 <= ord(c) <= 0xDFFF)
            error = PydanticCustomError("invalid_unicode", f"text must be valid Unicode; it holds a lone surrogate "
                                        f"(U+{bad:04X}), which is not a character")
            raise ValidationError.from_exception_data(cls.__name__, [
                InitErrorDetails(type=error, loc=loc, input=text)])
        return integral_numbers(data)


class _Options(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TextPart(_Strict):
    """A content part: {"type": "text", "text": ...}, or another type (image_url, input_audio, file...) that
    only some backends take; they refuse it before anything else happens (ChatBackend.check)."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "TextPart":
        if self.type == "text" and self.text is None:
            raise PydanticCustomError("missing_text", "a content part of type 'text' needs a string 'text'")
        return self


def _content_kind(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list[TextPart]" if isinstance(value, list) else None


# A string or an array of content parts; errors come from the branch the value's type picks.
Content = Annotated[Union[Annotated[str, Tag("str")], Annotated[list[TextPart], Tag("list[TextPart]")]],
                    Discriminator(_content_kind, custom_error_type="invalid_content",
                                  custom_error_message="content must be a string or an array of content parts")]


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="allow")

    role: Role
    content: Content | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_for_role(cls, content: str | list[TextPart] | None, info: ValidationInfo
                          ) -> str | list[TextPart] | None:
        role = info.data.get("role")
        if content is None and role in _CONTENT_REQUIRED:
            raise PydanticCustomError("missing_content", "a {role} message needs content: a string or an array "
                                      "of content parts", {"role": role})
        return content

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


class StreamOptions(_Strict):
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

    mode: PrefillMode | None = None
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


class ChatCompletionRequest(_Body):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None

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


class RetrieveRequest(_Options, _Body):
    collection: str = Field(min_length=1)
    query: str = Field(min_length=1)
    top_k: int = Field(retrieval_defaults.TOP_K, ge=1, le=100)


class IngestDocument(_Options):
    # Some text: a document of only whitespace has nothing to ingest (declared as a pattern in the schema).
    text: str = Field(min_length=1, json_schema_extra={"pattern": r"\S"})
    source: str | None = None
    id: str | None = None

    @model_validator(mode="after")
    def _has_text(self) -> "IngestDocument":
        if not self.text.strip():
            raise PydanticCustomError("nothing_to_ingest", "nothing to ingest from {source}: no text in it",
                                      {"source": self.source or self.id or "a document"})
        return self


class IngestRequest(_Options, _Body):
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
