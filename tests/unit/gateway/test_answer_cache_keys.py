"""What the semantic-cache key of an answer covers, computed by AnswerCache without a gateway: every forwarded
parameter, the question's other fields, and the model's configuration (against a live gateway and a stand-in
provider: tests/e2e/test_upstream_answers.py)."""

from __future__ import annotations

from typing import Any

import pytest
from blendgate.gateway.answer_cache import AnswerCache, model_fingerprints
from blendgate.gateway.config import Settings
from blendgate.gateway.schemas import ANSWER_NEUTRAL_PARAMS, OPENAI_CHAT_PARAMS, ChatCompletionRequest
from blendgate.semcache.settings import SemanticCacheSettings

MODEL = "standin"
QUESTION = "What is the capital of France?"


def _two_values(name: str) -> tuple[Any, Any]:
    declared = {"temperature": (0.1, 0.2), "top_p": (0.5, 0.6), "max_tokens": (5, 6), "max_completion_tokens": (5, 6),
                "presence_penalty": (0.1, 0.2), "frequency_penalty": (0.1, 0.2), "seed": (1, 2), "stop": ("a", "b")}
    return declared.get(name, ("a", "b"))


@pytest.mark.parametrize("name", sorted(set(OPENAI_CHAT_PARAMS) - ANSWER_NEUTRAL_PARAMS - {"n"}))
def test_every_forwarded_parameter_changes_the_key(name: str) -> None:
    cache = AnswerCache(SemanticCacheSettings(), lambda model: None, "system prompt", {})
    one, two = _two_values(name)

    def digest(value: Any) -> str:
        request = ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], name: value})
        return cache.context(request, None, None)[0]

    assert digest(one) != digest(two)


def test_the_question_s_other_fields_are_part_of_the_key() -> None:
    cache = AnswerCache(SemanticCacheSettings(), lambda model: None, "system prompt", {})

    def digest(**fields: Any) -> str:
        request = ChatCompletionRequest.model_validate(
            {"model": MODEL, "messages": [{"role": "user", "content": QUESTION, **fields}]})
        return cache.context(request, None, None)[0]

    assert digest(name="alice") != digest(name="bob")
    assert digest() == digest(content=[{"type": "text", "text": QUESTION}])


def test_the_model_s_configuration_is_part_of_the_key() -> None:
    """A model name routed to another provider model, or blending differently, never gets the old answers."""
    def digest(model: dict[str, Any], **settings: Any) -> str:
        config = Settings(models=[{"name": "m", **model}], **settings)
        cache = AnswerCache(SemanticCacheSettings(), lambda name: None, "system prompt", model_fingerprints(config))
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}]})
        return cache.context(request, None, None)[0]

    mini = {"backend": "litellm", "litellm_model": "openai/gpt-4o-mini"}
    assert digest(mini) != digest({**mini, "litellm_model": "openai/gpt-4o"})
    assert digest(mini) != digest({**mini, "api_base": "http://127.0.0.1:9/v1"})
    local = {"backend": "local"}
    assert digest(local) != digest({**local, "sampling_defaults": {"temperature": 0.3}})
    assert digest(local) != digest(local, chunk_cache={"recompute_ratio": 0.5})
    assert digest(local) == digest(local, chunk_cache={"cpu_bytes": 1 << 20})
