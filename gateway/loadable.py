"""Loadable: a part of the application state that loads in the background after the port opens (the document
collections' retriever, the semantic cache), so that /healthz can answer "loading" at once. The part's
users ask it for its value; the start-up task sets it once, or records why it failed."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

T = TypeVar("T")

LoadState = Literal["loading", "ready", "failed"]


class Loadable(Generic[T]):
    """`state`: "loading" until `set(value)` ("ready") or `fail(error)` ("failed"); `value`: the part once
    ready, else None; `error`: why it failed, else None."""

    def __init__(self) -> None:
        self._value: T | None = None
        self.error: str | None = None

    @classmethod
    def of(cls, value: T) -> "Loadable[T]":
        """A part that is there from the start."""
        loadable: Loadable[T] = cls()
        loadable.set(value)
        return loadable

    def set(self, value: T) -> None:
        self._value = value

    def fail(self, error: str) -> None:
        self.error = error

    @property
    def value(self) -> T | None:
        return self._value

    @property
    def state(self) -> LoadState:
        return "ready" if self._value is not None else "failed" if self.error is not None else "loading"
