"""A prompt as the engine receives it: token ids in segments, some of them cacheable chunks, and how to
prefill it (the chunk-cache modes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

PrefillMode = Literal["full_prefill", "prefix", "reuse", "blend"]
PREFILL_MODES: tuple[str, ...] = get_args(PrefillMode)
# What a chunk's KV is computed after: "system" (the prompt's first segment: system prompt and "Documents:"
# header, then the prompt's chunk_context: neutral documents) or "none" (the chunk alone).
ChunkPrefix = Literal["system", "none"]
CHUNK_PREFIXES: tuple[str, ...] = get_args(ChunkPrefix)
# Blending's defaults, defined once: the share of chunk tokens recomputed, and what chunk KV is computed
# after. bench/results/quality-2026-11-30.md says why.
DEFAULT_RECOMPUTE_RATIO = 0.15
DEFAULT_CHUNK_PREFIX: ChunkPrefix = "system"
# Neutral documents each chunk's KV is computed after (gateway/rag_template.py: CONTEXT_DOCUMENTS).
DEFAULT_CONTEXT_DOCUMENTS = 5


@dataclass(frozen=True)
class PromptSegment:
    token_ids: tuple[int, ...]
    is_chunk: bool = False  # a retrieved or given document chunk, whose KV may come from the chunk-cache
    # A chunk's own context: token ids its KV is computed after, following the prompt's first segment, in place
    # of the prompt's chunk_context (e.g. the text before it in its source document, with the template's
    # marker: gateway/rag_template.py: document_context_ids). Empty: the prompt's chunk_context.
    context: tuple[int, ...] = ()


@dataclass
class Prompt:
    segments: list[PromptSegment]
    # full_prefill: compute everything; prefix: reuse the KV of an exact shared prefix; reuse: chunk KV as
    # cached (recompute ratio 0); blend: chunk KV with the most deviating tokens recomputed.
    mode: PrefillMode = "full_prefill"
    recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO
    # Quality-targeted blending: the fidelity wanted (0..1], recompute_ratio then being the most spent.
    fidelity_target: float | None = None
    # Token ids every chunk's KV is computed after, following the first segment: a neutral context (documents
    # with their markers) so that each chunk is computed as a document among others, as it will stand. A chunk
    # segment with a context of its own is computed after that instead.
    chunk_context: tuple[int, ...] = ()
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = [t for segment in self.segments for t in segment.token_ids]

    @classmethod
    def plain(cls, token_ids: list[int]) -> "Prompt":
        return cls([PromptSegment(tuple(token_ids))])

    @property
    def has_chunks(self) -> bool:
        return any(s.is_chunk for s in self.segments)

    def __len__(self) -> int:
        return len(self.token_ids)
