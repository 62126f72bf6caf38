"""Reading an upstream provider's answer (as litellm hands it over) into the gateway's ChatResult and ChatChunks.

An answer is checked against OpenAI's shape before anything of it is used: at least one choice, a message
(or a stream's deltas) of the right types, and something in it (text, tool calls, a refusal, audio) unless the
provider says why not (a finish reason other than "stop": `length`, `content_filter`...). A stream must end
with a finish reason. Whatever fails raises MalformedAnswer, which the backend turns into 502 `upstream_error`;
nothing of such an answer reaches the client or the semantic cache. Choice-level fields besides the message
and the finish reason (`logprobs`, and fields litellm does not know) are passed on as the provider sent them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .base import ChatChunk, ChatResult, Usage

# litellm's own container for provider fields it has no name for; its entries are passed on under their names.
_LITELLM_CONTAINER = "provider_specific_fields"


class MalformedAnswer(ValueError):
    """The provider's answer does not have OpenAI's shape, or says nothing; the message says what is wrong."""


class _Part(BaseModel):
    """A part of the answer; fields litellm keeps in its own container are checked and passed on by name."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _unpack_litellm_container(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get(_LITELLM_CONTAINER), dict):
            data = {**data[_LITELLM_CONTAINER], **data}
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != _LITELLM_CONTAINER}
        return data


class AnswerMessage(_Part):
    """A message or a stream's delta: the fields that carry an answer, with their types checked."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None

    def carries_answer(self) -> bool:
        return bool(self.content or self.tool_calls or self.function_call or self.refusal or self.audio)


class _Choice(_Part):
    index: int = 0
    finish_reason: str | None = None
    # The provider's own finish reason, which litellm keeps when it maps an unknown one to "stop".
    native_finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class CompletionChoice(_Choice):
    message: AnswerMessage


class ChunkChoice(_Choice):
    delta: AnswerMessage = Field(default_factory=AnswerMessage)


class _Usage(_Part):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def as_usage(self) -> Usage:
        return Usage(self.prompt_tokens or 0, self.completion_tokens or 0)


class Completion(_Part):
    choices: list[CompletionChoice] = Field(min_length=1)
    usage: _Usage | None = None


class Chunk(_Part):
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: _Usage | None = None


Answer = TypeVar("Answer", Completion, Chunk)


def _fields(part: BaseModel, *leave_out: str) -> dict[str, Any]:
    """A part's fields as the provider sent them, without empty ones."""
    return {k: v for k, v in part.model_dump(exclude=set(leave_out)).items() if v is not None}


def _parse(model: type[Answer], raw: Any) -> Answer:
    data = raw.model_dump() if hasattr(raw, "model_dump") else raw
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise MalformedAnswer(f"{where}: {first['msg']}") from None


def _check_says_something(message: AnswerMessage, finish_reason: str | None) -> None:
    if not message.carries_answer() and finish_reason in (None, "stop"):
        raise MalformedAnswer(f"an empty answer with finish_reason {finish_reason!r}")


def read_completion(raw: Any) -> tuple[ChatResult, Usage | None]:
    """The first choice of a non-streamed answer, and its usage. Raises MalformedAnswer."""
    completion = _parse(Completion, raw)
    choice = completion.choices[0]
    _check_says_something(choice.message, choice.finish_reason)
    message = _fields(choice.message)
    message.setdefault("role", "assistant")
    message.setdefault("content", None)
    result = ChatResult(message=message, finish_reason=choice.finish_reason,
                        choice=_fields(choice, "index", "message", "finish_reason"))
    return result, completion.usage.as_usage() if completion.usage is not None else None


class StreamReader:
    """Turns a stream's chunks into ChatChunks, checking each and the stream as a whole.

    Deltas that carry nothing (the opening role chunk) are held back and merged into the next one, so a stream
    that turns out empty fails before anything is sent and the client gets the error's status code."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finished = False
        self.said_something = False
        self._held: ChatChunk | None = None

    def feed(self, raw: Any) -> ChatChunk | None:
        """The ChatChunk to send for one upstream chunk, or None (nothing to send yet). Raises MalformedAnswer."""
        chunk = _parse(Chunk, raw)
        if chunk.usage is not None:
            self.usage = chunk.usage.as_usage()
        if not chunk.choices or self.finished:  # usage-only chunks; nothing is sent after the finish
            return None
        choice = chunk.choices[0]
        self.said_something = self.said_something or choice.delta.carries_answer()
        if choice.finish_reason is not None:
            self.finished = True
            if not self.said_something:
                _check_says_something(choice.delta, choice.finish_reason)
        piece = ChatChunk(delta=_fields(choice.delta), finish_reason=choice.finish_reason,
                          choice=_fields(choice, "index", "delta", "finish_reason"))
        if self._held is not None:
            piece = ChatChunk(delta={**self._held.delta, **piece.delta}, finish_reason=piece.finish_reason,
                              choice={**self._held.choice, **piece.choice})
            self._held = None
        if not self.said_something and not self.finished:
            self._held = piece
            return None
        return piece if piece.delta or piece.finish_reason or piece.choice else None

    def end(self) -> None:
        """The stream ended: raises MalformedAnswer when it never gave a finish reason."""
        if not self.finished:
            raise MalformedAnswer("the stream ended without a finish_reason")
