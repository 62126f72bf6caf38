"""The one RAG prompt template, as text for any backend and as token segments for the local engine.

The prompt: the system prompt, the conversation so far, then a last user message: "Documents:", for each
chunk a blank line, "[i]" and the chunk's text, then a blank line, "Question: <question>" and an
instruction to answer from the documents. Each chunk's text is a segment of its own so that the local
engine can reuse the chunk's KV wherever it lands.

Plain Python on purpose (no web framework, no retriever): benchmarks use it on GPU machines as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

from ..engine.prompt import DEFAULT_RECOMPUTE_RATIO, Prompt, PromptSegment

DOCUMENTS_HEADER = "Documents:"
CHUNK_MARKER = "\n\n[{index}]"
QUESTION_TEMPLATE = "\n\nQuestion: {question}\nAnswer briefly from the documents."
# Neutral documents. With chunk prefix "context" (chunkcache/runner.py), every chunk's KV is computed after the
# prompt's first segment and these documents with their markers: as a document that follows others, which is
# what most chunks of a RAG prompt are.
CONTEXT_DOCUMENTS = (
    "Encyclopedia. An encyclopedia is a reference work that gives summaries of knowledge on many subjects, "
    "arranged in articles by name or by topic; its articles are written by experts and checked by editors.",
    "Library. A library is a collection of books, periodicals and other materials kept for reading, study and "
    "reference; public libraries lend them to the people of a town without charge.",
    "Museum. A museum is an institution that cares for objects of artistic, cultural, historical or scientific "
    "importance and shows them to the public in permanent and temporary exhibitions.",
    "Almanac. An almanac is a yearly publication listing events expected in the coming year, with tables of "
    "dates, tides, weather forecasts and the rising and setting of the sun and moon.",
    "Atlas. An atlas is a collection of maps of the Earth or of a region, often bound as a book, with tables, "
    "facts about places and an index of their names.",
)
# Two stand-ins for the RAG user message that differ in their one character: the chat template rendered with
# each differs only where the message goes, which locates it by position, whatever the other messages hold.
_STAND_INS = ("a", "b")


# What a retrieved chunk's KV is computed after: "document", the chunk before it in its own document where
# there is one (RetrievedChunk.previous, document_context_ids), else the neutral documents; "neutral", always the
# neutral documents. "document" closed 91% of the KL gap against 79% for "neutral" on XQuAD same-article
# distractors at r = 0.15 (bench/results/quality-2026-11-30.md, 2026-12-01).
ChunkContext = Literal["document", "neutral"]
DEFAULT_CHUNK_CONTEXT: ChunkContext = "document"


class ChunkLike(Protocol):
    id: str
    text: str
    previous: str | None  # the text before the chunk in its document (its previous chunk); None: none known


@dataclass
class RagPrompt:
    system: str
    chunks: list[ChunkLike]
    question: str

    def segments(self) -> list[tuple[str, bool]]:
        """The last user message, piece by piece, each with whether it is a chunk: the header, then per
        chunk its marker and its text (the cacheable part, the same wherever it is placed), then the
        question. Segments are cut where tokenising them one by one gives the tokens that tokenising the
        whole text would: the space before a chunk's first word belongs to the chunk (" The"), and blank
        lines to what follows them ("\\n\\n[2]" tokenises as "\\n", "\\n", "[" in both cases)."""
        parts = [(DOCUMENTS_HEADER, False)]
        for i, chunk in enumerate(self.chunks, start=1):
            parts += [(CHUNK_MARKER.format(index=i), False), (f" {chunk.text}", True)]
        return [*parts, (QUESTION_TEMPLATE.format(question=self.question), False)]

    def text(self) -> str:
        return "".join(text for text, _ in self.segments())


def rag_context_ids(tokenizer, documents: int) -> tuple[int, ...]:
    """Token ids of the first `documents` CONTEXT_DOCUMENTS, each after its marker, and the next marker, each
    piece tokenised as the template's segments are: what each chunk's KV is computed after (Prompt's
    chunk_context). Raises ValueError past the documents there are."""
    if not 0 <= documents <= len(CONTEXT_DOCUMENTS):
        raise ValueError(f"there are {len(CONTEXT_DOCUMENTS)} context documents, not {documents}")
    if documents == 0:
        return ()
    parts = []
    for index, text in enumerate(CONTEXT_DOCUMENTS[:documents], start=1):
        parts += [CHUNK_MARKER.format(index=index), f" {text}"]
    parts.append(CHUNK_MARKER.format(index=documents + 1))
    return tuple(t for part in parts for t in tokenizer(part, add_special_tokens=False)["input_ids"])


def document_context_ids(tokenizer, previous: str) -> tuple[int, ...]:
    """Token ids of the text before a chunk in its own source document (e.g. the document's previous chunk) as
    the template would place it, "[1]" and that text, then the next marker "[2]", each piece tokenised as the
    template's segments are: what that chunk's KV is computed after (PromptSegment.context), in place of the
    neutral documents. Known at ingest, whatever the query; a chunk among related passages then drifts less
    (Cache-Craft arXiv 2502.15734 reuses KV computed in earlier contexts; Anthropic's "contextual retrieval"
    prepends document context to chunks). Raises ValueError on empty text (use the neutral context then)."""
    if not previous:
        raise ValueError("a document context needs the text before the chunk")
    parts = [CHUNK_MARKER.format(index=1), f" {previous}", CHUNK_MARKER.format(index=2)]
    return tuple(t for part in parts for t in tokenizer(part, add_special_tokens=False)["input_ids"])


def chunk_contexts_for(tokenizer, chunks: Sequence[ChunkLike], chunk_context: ChunkContext
                       ) -> list[tuple[int, ...]] | None:
    """encode_prompt's `chunk_contexts` for a prompt's chunks under the `chunk_context` setting: with
    "document", per chunk its document context (document_context_ids of its `previous`), or () (the neutral
    documents) for a chunk without one (a document's first chunk, an inline document); with "neutral", or
    when no chunk has a predecessor, None (every chunk after the neutral documents, as before)."""
    if chunk_context == "neutral" or not any(chunk.previous for chunk in chunks):
        return None
    return [document_context_ids(tokenizer, chunk.previous) if chunk.previous else () for chunk in chunks]


def context_documents_for(chunks: int, limit: int) -> int:
    """How many neutral documents a prompt's chunks are computed after: half of the other chunks a chunk
    stands among in this prompt, (chunks - 1) // 2 (its average place), at most `limit`. Measured: five
    documents won back most at 10 and 20 chunks; with 2 to 4 chunks, five did worse than none on the few
    questions tried (bench/results/quality-2026-11-30.md)."""
    return max(0, min(limit, (chunks - 1) // 2))


def rag_messages(history: list[dict], prompt: RagPrompt) -> list[dict]:
    """Chat messages (role/content dicts) with the chunks placed: the history before the question, a system
    message first unless the history has one, the RAG user message last."""
    has_system = any(m["role"] in ("system", "developer") for m in history)
    head = [] if has_system else [{"role": "system", "content": prompt.system}]
    return [*head, *history, {"role": "user", "content": prompt.text()}]


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat template's text for `messages`, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _around_last_message(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """The chat template's text before and after the last message's content: found by rendering the messages
    with two stand-ins for that content and cutting where the renderings differ (by position, so no text a
    client sends can be taken for the place of the RAG message)."""
    first, second = (render_chat(tokenizer, [*messages[:-1], {**messages[-1], "content": stand_in}])
                     for stand_in in _STAND_INS)
    start = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    end = len(first) - next(i for i, (x, y) in enumerate(zip(reversed(first), reversed(second))) if x != y)
    if end - start != 1 or first[start] != _STAND_INS[0]:
        raise ValueError("the chat template does not place the last message's content as it is")
    return first[:start], first[end:]


def encode_prompt(tokenizer, messages: list[dict], rag: RagPrompt | None, *, mode: str = "full_prefill",
                  recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO, fidelity_target: float | None = None,
                  context_documents: int = 0, chunk_contexts: Sequence[tuple[int, ...]] | None = None) -> Prompt:
    """Token ids of chat `messages` through the tokenizer's chat template; with `rag` (whose text is the last
    message), in segments so that each chunk's tokens are the same wherever the chunk is placed, and with
    `context_documents` neutral documents as what the chunks' KV is computed after (chunk_context).
    `chunk_contexts`: per chunk of `rag`, in order, the token ids its KV is computed after instead
    (PromptSegment.context, e.g. document_context_ids; empty: the neutral documents). Raises ValueError when
    their count is not the chunks'."""

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    if rag is None:
        return Prompt.plain(list(encode(render_chat(tokenizer, messages))))
    before, after = _around_last_message(tokenizer, messages)
    parts = rag.segments()
    # The chat template's text around the user message joins the first and last segments.
    parts[0] = (before + parts[0][0], False)
    parts[-1] = (parts[-1][0] + after, False)
    contexts = iter(chunk_contexts if chunk_contexts is not None else [() for _ in rag.chunks])
    if chunk_contexts is not None and len(chunk_contexts) != len(rag.chunks):
        raise ValueError(f"{len(chunk_contexts)} chunk contexts for {len(rag.chunks)} chunks")
    return Prompt([PromptSegment(encode(part), is_chunk, tuple(next(contexts)) if is_chunk else ())
                   for part, is_chunk in parts], mode=mode,
                  recompute_ratio=recompute_ratio, fidelity_target=fidelity_target,
                  chunk_context=rag_context_ids(tokenizer, context_documents))
