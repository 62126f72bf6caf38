"""Token-aware chunking on paragraph and sentence boundaries, with stable chunk ids.

Chunks are measured in tokens of the served model's tokenizer because the chunk is also the unit whose
KV the chunk-cache stores. The id hashes the tokenizer's fingerprint with the chunk's text, so the same
text under the same tokenizer always has the same id (and the same token ids), wherever it comes from.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from . import defaults

# A paragraph break, or a sentence end followed by whitespace. The separator stays with the text before it,
# so joining the pieces gives the original text back.
_PARAGRAPH = re.compile(r"(?<=\n)\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?。！？])[\"')\]]*\s+")


def tokenizer_fingerprint(tokenizer: object) -> str:
    """Identifies a tokenizer by its full vocabulary and rules, not by a name that may be reused."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))  # type: ignore
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def chunk_id(fingerprint: str, text: str) -> str:
    return hashlib.sha256(f"{fingerprint}\n{text}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Chunk:
    id: str
    text: str
    token_count: int
    position: int  # index of the chunk within its document


def _split_keep(pattern: re.Pattern[str], text: str) -> list[str]:
    pieces, start = [], 0
    for match in pattern.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p for p in pieces if p]


class Chunker:
    def __init__(self, tokenizer: object, chunk_tokens: int = defaults.CHUNK_TOKENS,
                 overlap_tokens: int = defaults.OVERLAP_TOKENS) -> None:
        if not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError("overlap_tokens must be at least 0 and less than chunk_tokens")
        self.tokenizer = tokenizer
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's length in tokens of the chunker's tokenizer (no special tokens)."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        return [len(ids) for ids in encoded]

    def _units(self, text: str) -> list[tuple[str, int]]:
        """Sentences (inside paragraphs), each with its token count; ones longer than a chunk are cut by tokens."""
        pieces = [s for p in _split_keep(_PARAGRAPH, text) for s in _split_keep(_SENTENCE, p)]
        units = []
        for piece, count in zip(pieces, self.count_tokens(pieces)):
            if count <= self.chunk_tokens:
                units.append((piece, count))
                continue
            ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            step = self.chunk_tokens - self.overlap_tokens
            for start in range(0, len(ids), step):
                window = ids[start:start + self.chunk_tokens]
                units.append((self.tokenizer.decode(window), len(window)))  # type: ignore[attr-defined]
                if start + self.chunk_tokens >= len(ids):
                    break
        return units

    def chunk(self, text: str) -> list[Chunk]:
        units = self._units(text.strip())
        chunks: list[Chunk] = []
        start = 0
        while start < len(units):
            end, total = start, 0
            while end < len(units) and (end == start or total + units[end][1] <= self.chunk_tokens):
                total += units[end][1]
                end += 1
            body = "".join(u[0] for u in units[start:end]).strip()
            if body:
                chunks.append(Chunk(chunk_id(self.fingerprint, body), body, self.count_tokens([body])[0], len(chunks)))
            if end >= len(units):
                break
            # Overlap: the next chunk repeats the last whole sentences that fit in overlap_tokens.
            back, carried = end, 0
            while back > start + 1 and carried + units[back - 1][1] <= self.overlap_tokens:
                back -= 1
                carried += units[back][1]
            start = back
        return chunks
