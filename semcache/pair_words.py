"""The words two questions do not share, weighed by how rare they are: the verifier's word-level evidence.

Quora's different-answer pairs at high cosine mostly swap one content word for another ("rehab center in
Appling County" / "in Towns County", "Haiti" / "Paraguay", "badminton" / "table tennis"), where paraphrases
add or drop common words ("my class" / "class", "What's" / "What is"). So the features here tell a
substitution (each side has a word the other lacks) from an addition, and a rare word (a name, a topic) from
a common one (inverse document frequency over the training questions, `WordRarity`). Words are compared
after a crude suffix strip (`stem`: "emotions" and "emotion" are one word), stop words left out.

Plain Python: a regular expression, set operations and dictionary look-ups per pair (tens of microseconds;
a question's content words are kept for the 8,192 questions seen last).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

from .guards import STOPWORDS, tokens

_SUFFIXES = ("ing", "ed", "es", "s")
# The word-difference features, in the order `word_differences` gives them (verifier.FEATURES names them).
WORD_FEATURES = ("substituted_words", "added_words", "differing_rarity", "rarest_differing",
                 "substituted_rarity", "rarity_overlap")


@lru_cache(maxsize=65_536)
def stem(word: str) -> str:
    """`word` lower-cased less one common inflection suffix, keeping at least 3 letters ("emotions" ->
    "emotion", "started" -> "start", "is" -> "is")."""
    word = word.lower()
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


# Besides the stop words: what is left of a negative contraction once guards.tokens split it ("can't" is
# "ca" and "n't"; the negation guard looks after the "n't").
_STEMMED_STOPWORDS = frozenset(stem(w) for w in STOPWORDS) | {"n", "ca", "wo", "sha"}


# Kept for the questions seen last: a lookup checks one query against several candidates, and popular cached
# questions come back lookup after lookup.
@lru_cache(maxsize=8_192)
def content_words(text: str) -> frozenset[str]:
    """The stemmed words of `text` that are not stop words (numbers included), contractions cut at the
    apostrophe ("What's" is "what", "they're" is "they")."""
    return frozenset(stem(w.split("'", 1)[0]) for w in tokens(text)) - _STEMMED_STOPWORDS


@dataclass(frozen=True)
class WordRarity:
    """Document frequencies of content words over a set of questions (the hand-off from training, through
    the verifier's weights file, to the features): `idf(word)` = ln((questions + 1) / (count + 1)), a word
    never seen (or seen once: rarer ones are not kept) counting as seen once."""

    questions: int
    counts: dict[str, int]

    # Words seen in fewer questions than this are left out of the file (they count as seen once).
    KEEP_FROM = 2

    @classmethod
    def from_questions(cls, questions: Iterable[str]) -> "WordRarity":
        unique = set(questions)
        counts: Counter[str] = Counter()
        for question in unique:
            counts.update(content_words(question))
        return cls(len(unique), {w: c for w, c in sorted(counts.items()) if c >= cls.KEEP_FROM})

    def idf(self, word: str) -> float:
        return math.log((self.questions + 1) / (self.counts.get(word, 1) + 1))

    def to_json(self) -> dict[str, Any]:
        return {"questions": self.questions, "counts": self.counts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "WordRarity":
        """Raises ValueError, KeyError or TypeError for data not made by `to_json`."""
        counts = {str(w): int(c) for w, c in data["counts"].items()}
        return cls(int(data["questions"]), counts)


def word_differences(query: str, cached: str, rarity: WordRarity) -> tuple[float, ...]:
    """WORD_FEATURES of a pair: the content words only one side has, counted as substitutions (min of the two
    sides' counts) and additions (the rest), the sum and the largest of their idf, the idf of the rarest word
    each side lacks from the other (the smaller of the two: large only when both sides have a rare word of
    their own, a swapped name), and the idf-weighted share of content words both have (1.0 when neither has
    any)."""
    first, second = content_words(query), content_words(cached)
    only_first = sorted((rarity.idf(w) for w in first - second), reverse=True)
    only_second = sorted((rarity.idf(w) for w in second - first), reverse=True)
    substituted = min(len(only_first), len(only_second))
    union = sum(rarity.idf(w) for w in first | second)
    return (float(substituted), float(max(len(only_first), len(only_second)) - substituted),
            sum(only_first) + sum(only_second), max(only_first + only_second, default=0.0),
            min(only_first[0] if only_first else 0.0, only_second[0] if only_second else 0.0),
            sum(rarity.idf(w) for w in first & second) / union if union else 1.0)
