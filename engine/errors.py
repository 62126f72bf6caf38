"""What the local engine raises to its callers (the gateway's local backend maps each to an HTTP error)."""

from __future__ import annotations


class EngineError(Exception):
    pass


class QueueFullError(EngineError):
    """Every running slot and every waiting place is taken (the gateway answers 503)."""


class PromptTooLongError(EngineError):
    def __init__(self, prompt_tokens: int, max_context_tokens: int) -> None:
        super().__init__(f"the prompt has {prompt_tokens} tokens but the model's context holds {max_context_tokens}")
        self.prompt_tokens = prompt_tokens
        self.max_context_tokens = max_context_tokens
