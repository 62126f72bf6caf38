"""A prompt as the engine receives it: token ids in segments, some of them cacheable chunks, and how to
prefill it (the chunk-cache modes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PrefillMode = Literal["full_prefill", "prefix", "reuse", "blend"]
PREFILL_MODES: tuple[str, ...] = ("full_prefill", "prefix", "reuse", "blend")


@dataclass(frozen=True)
class PromptSegment:
    token_ids: tuple[int, ...]
    is_chunk: bool = False  # a retrieved or given document chunk, whose KV may come from the chunk-cache


@dataclass
class Prompt:
    segments: list[PromptSegment]
    # full_prefill: compute everything; prefix: reuse the KV of an exact shared prefix; reuse: chunk KV as
    # cached (recompute ratio 0); blend: chunk KV with the most deviating tokens recomputed.
    mode: PrefillMode = "full_prefill"
    recompute_ratio: float = 0.15
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
