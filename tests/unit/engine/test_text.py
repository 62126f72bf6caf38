"""Detokenisation and stop sequences, with the embedded model's real tokenizer."""

from __future__ import annotations

import pytest
from blendgate.engine.detokenizer import IncrementalDetokenizer, StopMatcher


def test_incremental_detokenizer_matches_whole_decode(tokenizer) -> None:
    text = "Héllo wörld! 日本語のテキスト 🎉🎉 done.\nNew line, tabs\tand  spaces."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


@pytest.mark.parametrize(
    "stops, pieces, expected, stopped",
    [
        ([], ["a", "b"], "ab", False),
        (["END"], ["hello E", "N", "D more"], "hello ", True),
        (["END"], ["hello E", "N", "d"], "hello ENd", False),  # held back, then released
        (["\n\n", "###"], ["one\n", "\ntwo"], "one", True),
        (["ab", "b"], ["xab"], "x", True),  # the earliest stop wins
        (["stop"], ["sto"], "sto", False),  # unfinished stop at the end is flushed as text
    ],
)
def test_stop_matcher(stops, pieces, expected, stopped) -> None:
    assert feed_all(stops, pieces) == (expected, stopped)


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("The answer is 42 <") == "The answer is 42 "
    assert matcher.feed("b>") == "<b>"
