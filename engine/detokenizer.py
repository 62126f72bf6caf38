"""Generated token ids -> text deltas, and OpenAI `stop` sequences applied to that text."""

from __future__ import annotations

# Decoding a partial UTF-8 sequence yields this; wait for the next token before emitting.
_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas.

    Decoding token by token breaks words and multi-byte characters, so each step decodes a short window
    (from `prefix` on) and emits only what the newest tokens added past the already emitted part.
    """

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Cuts the output at the first stop sequence and holds back text that may be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit now; sets `stopped` once a stop sequence appears."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        """At the end of generation, held-back text was not a stop sequence after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
