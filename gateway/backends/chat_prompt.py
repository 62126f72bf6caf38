"""Chat requests as prompts for the backends that tokenise in the gateway (local and SGLang): which requests
they can take, the prompt's tokens through the model's chat template (in segments for RAG), the sampling
settings with the model's defaults, and the error for a prompt over the context."""

from __future__ import annotations

from ...engine.prompt import Prompt
from ...engine.sampling import SamplingParams
from ..config import SamplingDefaults
from ..errors import GatewayError
from ..rag_template import DEFAULT_CHUNK_CONTEXT, ChunkContext, chunk_contexts_for, context_documents_for, encode_prompt
from ..schemas import ChatCompletionRequest
from .request import BackendRequest

# Chat roles the chat templates understand; OpenAI's "developer" is the newer name for "system".
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def check_text_chat(request: ChatCompletionRequest, served_by: str) -> None:
    """Refuse (400) what a text-only chat template cannot carry: tools, logprobs, structured output, images."""
    extra = request.model_extra or {}
    for name in ("tools", "functions"):
        if extra.get(name):
            raise GatewayError(400, f"'{name}' is not supported by {request.model} ({served_by})",
                               code="unsupported_parameter", param=name)
    if extra.get("logprobs"):
        raise GatewayError(400, f"'logprobs' is not supported by {served_by} yet",
                           code="unsupported_parameter", param="logprobs")
    response_format = extra.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type", "text") != "text":
        raise GatewayError(400, f"only response_format type 'text' is supported by {served_by}",
                           code="unsupported_parameter", param="response_format")
    for index, message in enumerate(request.messages):
        if message.role not in ROLE_MAP:
            raise GatewayError(400, f"role '{message.role}' is not supported by {served_by} (tool calls are not)",
                               code="unsupported_value", param=f"messages[{index}].role")
        if message.non_text_parts():
            raise GatewayError(400, f"content parts of type {message.non_text_parts()} are not supported; "
                                    f"{served_by} take text only",
                               code="unsupported_value", param=f"messages[{index}].content")


def chat_prompt(tokenizer, request: BackendRequest, *, mode: str, recompute_ratio: float,
                fidelity_target: float | None = None, context_documents: int = 0,
                chunk_context: ChunkContext = DEFAULT_CHUNK_CONTEXT) -> Prompt:
    """The prompt's tokens; for RAG (request.rag_prompt), in segments whose chunk KV can be reused, with the
    request's prefill mode, ratio and fidelity target when it names them (its `blend` object), else the given
    ones, and chunk KV computed after up to `context_documents` neutral documents
    (rag_template.context_documents_for), or with `chunk_context` "document" each retrieved chunk that has a
    predecessor in its document after that (rag_template.chunk_contexts_for)."""
    messages = [{"role": ROLE_MAP[m.role], "content": m.text()} for m in request.chat.messages]
    blend = request.chat.blend
    mode = (blend.mode if blend and blend.mode else None) or mode
    ratio = blend.recompute_ratio if blend and blend.recompute_ratio is not None else recompute_ratio
    target = blend.fidelity_target if blend and blend.fidelity_target is not None else fidelity_target
    rag = request.rag_prompt
    documents = context_documents_for(len(rag.chunks), context_documents) if rag is not None else 0
    contexts = chunk_contexts_for(tokenizer, rag.chunks, chunk_context) if rag is not None else None
    return encode_prompt(tokenizer, messages, rag, mode=mode, recompute_ratio=ratio, fidelity_target=target,
                         context_documents=documents, chunk_contexts=contexts)


def sampling_params(request: ChatCompletionRequest, defaults: SamplingDefaults, max_new_tokens: int) -> SamplingParams:
    """The request's sampling settings, the model's defaults where it sets none."""
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
    )


def context_length_error(max_context_tokens: int, prompt_tokens: int) -> GatewayError:
    """413 in OpenAI's words for a prompt that does not fit the model's context."""
    return GatewayError(413, f"This model's maximum context length is {max_context_tokens} tokens, but the "
                             f"messages have {prompt_tokens} tokens.", code="context_length_exceeded",
                        param="messages")
