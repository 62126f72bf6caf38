"""The RAG template: segments tokenised one by one give exactly the tokens of the whole prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from blendgate.gateway.backends.local import LocalBackend
from blendgate.gateway.backends.request import BackendRequest
from blendgate.gateway.config import LocalModelConfig
from blendgate.gateway.rag import rewrite_messages
from blendgate.gateway.rag_template import RagPrompt
from blendgate.gateway.schemas import ChatCompletionRequest
from blendgate.retriever.service import RetrievedChunk
from support import REPO

SQUAD = REPO.parent / "shared" / "data" / "qa" / "xquad.en.json"


def sample_texts() -> list[str]:
    texts = ["The blue castle stands on a granite hill. Its secret code is 4711.",
             "Line one.\nLine two, with a list:\n- a\n- b", "Prices rose 3.5% (year on year) in 2024!"]
    if SQUAD.exists():
        data = json.loads(SQUAD.read_text())["data"]
        texts += [p["context"] for article in data[:6] for p in article["paragraphs"][:2]]
    return texts


def test_segmented_tokens_equal_whole_prompt_tokens(loaded_model, tokenizer) -> None:
    backend = LocalBackend(LocalModelConfig(name="m"), cache_dir=Path("."), max_running=1, max_waiting=1)
    backend.model = loaded_model
    texts = sample_texts()
    for start in range(0, len(texts), 3):
        chunks = [RetrievedChunk(f"c{i}", text, "s", 0, 1.0, 0) for i, text in enumerate(texts[start:start + 3])]
        for system in (None, "You are terse."):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "What does the text say about prices?"}]
            request = ChatCompletionRequest(model="m", messages=messages)
            rag = RagPrompt("Answer the question using only the documents given.", chunks,
                            "What does the text say about prices?")
            request = request.model_copy(update={"messages": rewrite_messages(request, rag)})
            prompt = backend._prompt(BackendRequest(request, "t", rag))
            whole = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in request.messages],
                                                  tokenize=False, add_generation_prompt=True)
            assert prompt.token_ids == tokenizer(whole, add_special_tokens=False)["input_ids"]
            assert sum(s.is_chunk for s in prompt.segments) == len(chunks)


def test_the_chunk_context_is_neutral_documents_tokenised_as_the_template_places_them(tokenizer) -> None:
    from blendgate.gateway.rag_template import CONTEXT_DOCUMENTS, encode_prompt, rag_context_ids, rag_messages

    assert rag_context_ids(tokenizer, 0) == ()
    three = rag_context_ids(tokenizer, 3)
    # The same tokens a prompt with these documents as its first three chunks has after its first segment.
    rag = RagPrompt("S", [RetrievedChunk(str(i), text, "s", 0, 1.0, 0) for i, text in enumerate(CONTEXT_DOCUMENTS[:3])]
                    + [RetrievedChunk("x", "Next.", "s", 0, 1.0, 0)], "Q?")
    prompt = encode_prompt(tokenizer, rag_messages([], rag), rag)
    following = [t for segment in prompt.segments[1:8] for t in segment.token_ids]
    assert list(three) == following
    assert encode_prompt(tokenizer, rag_messages([], rag), rag, context_documents=3).chunk_context == three
    assert encode_prompt(tokenizer, rag_messages([], rag), rag).chunk_context == ()
    with pytest.raises(ValueError, match="context documents"):
        rag_context_ids(tokenizer, len(CONTEXT_DOCUMENTS) + 1)


def test_a_chunks_document_context_is_its_predecessor_tokenised_as_the_template_places_it(tokenizer) -> None:
    from blendgate.gateway.rag_template import document_context_ids, encode_prompt, rag_messages

    before = "The castle was built in 1420."
    context = document_context_ids(tokenizer, before)
    # The tokens a prompt with the predecessor as its first chunk has between its first segment and second chunk.
    rag = RagPrompt("S", [RetrievedChunk("a", before, "s", 0, 1.0, 0), RetrievedChunk("b", "Next.", "s", 0, 1.0, 0)],
                    "Q?")
    prompt = encode_prompt(tokenizer, rag_messages([], rag), rag, chunk_contexts=[(), context])
    assert list(context) == [t for segment in prompt.segments[1:4] for t in segment.token_ids]
    assert [s.context for s in prompt.segments if s.is_chunk] == [(), context]
    assert all(not s.context for s in prompt.segments if not s.is_chunk)
    with pytest.raises(ValueError, match="chunk contexts"):
        encode_prompt(tokenizer, rag_messages([], rag), rag, chunk_contexts=[context])
    with pytest.raises(ValueError, match="text before"):
        document_context_ids(tokenizer, "")


def test_chunks_are_computed_after_about_as_many_documents_as_stand_before_them_on_average() -> None:
    from blendgate.gateway.rag_template import context_documents_for

    assert [context_documents_for(k, 5) for k in (1, 2, 3, 4, 5, 10, 11, 20)] == [0, 0, 1, 1, 2, 4, 5, 5]
    assert context_documents_for(20, 0) == 0 and context_documents_for(0, 5) == 0


def test_the_gateway_computes_a_retrieved_chunk_after_its_documents_previous_chunk(loaded_model, tokenizer) -> None:
    from blendgate.gateway.config import ChunkCacheSettings
    from blendgate.gateway.rag_template import chunk_contexts_for, document_context_ids, rag_context_ids

    first = "The castle was built in 1420 by the duke."
    chunks = [RetrievedChunk("a", first, "castle.txt", 0, 0.9, 0),
              RetrievedChunk("b", "It has nine towers.", "castle.txt", 1, 0.8, 0, previous=first),
              RetrievedChunk("c", "Bread is baked on Tuesdays.", "request#0", 0, 1.0, 0)]
    rag = RagPrompt("S", chunks, "How many towers?")
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "How many towers?"}])
    request = BackendRequest(request.model_copy(update={"messages": rewrite_messages(request, rag)}), "t", rag)

    def prompt_with(chunk_context: str | None):
        settings = ChunkCacheSettings() if chunk_context is None else ChunkCacheSettings(chunk_context=chunk_context)
        backend = LocalBackend(LocalModelConfig(name="m"), cache_dir=Path("."), max_running=1, max_waiting=1,
                               chunk_cache=settings)
        backend.model = loaded_model
        return backend._prompt(request)

    default, neutral = prompt_with(None), prompt_with("neutral")
    # The default: the second chunk after the first (its predecessor), the others after the neutral documents.
    assert [s.context for s in default.segments if s.is_chunk] == [(), document_context_ids(tokenizer, first), ()]
    # "neutral": every chunk after the neutral documents, as before the setting.
    assert all(not s.context for s in neutral.segments)
    assert default.token_ids == neutral.token_ids and default.chunk_context == neutral.chunk_context \
        == rag_context_ids(tokenizer, 1)
    # Inline documents and first chunks (no predecessor): no context of their own under either setting.
    assert chunk_contexts_for(tokenizer, [chunks[0], chunks[2]], "document") is None
    assert chunk_contexts_for(tokenizer, chunks, "neutral") is None
