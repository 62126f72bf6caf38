"""Guards for candidate hits: cheap checks for the differences embeddings barely see.

Two questions a sentence embedding puts close together often differ in one number ("2 years" / "5 years"),
one name ("learn Python" / "learn Java"), a negation ("can I" / "can't I"), an opposed comparison word
("best" / "worst", "positive effects" / "negative effects") or two words exchanged ("Do Croats like Turks?" /
"Do Turks like Croats?"). Each guard says whether a (query, cached question) pair differs in that way. Plain
Python: a few regular expressions and set operations per pair (microseconds).

Their flags are features of the verifier's classifier (verifier.py) and name the reason of a rejection; the
number, name, negation, opposites and exchanged-words guards also refuse a candidate on their own
(verifier.VETO_GUARDS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"n't|[A-Za-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
_SPLIT_NEGATION = re.compile(r"(\w)n't\b", re.IGNORECASE)

# "one" is not among them: in questions it is mostly the pronoun ("How does one...", "any one", "which one");
# counted as 1 it refused 63 duplicates among 73 QQP tuning pairs at cosine >= 0.89 (86%, against 79% of all).
NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
    "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
    "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000",
    "billion": "1000000000", "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5",
    "half": "0.5", "single": "1", "twice": "2", "double": "2", "dozen": "12",
}
NEGATIONS = {"not", "no", "never", "n't", "without", "none", "nobody", "nothing", "neither", "nor", "cannot",
             "nowhere", "against"}
# Words that flip a question's answer when swapped for their opposite (each maps to its group).
_OPPOSED = [("best", "worst"), ("better", "worse"), ("more", "less", "fewer"), ("most", "least", "fewest"),
            ("before", "after"), ("higher", "lower"), ("highest", "lowest"), ("increase", "decrease", "reduce"),
            ("advantages", "disadvantages"), ("pros", "cons"), ("maximum", "minimum"), ("max", "min"),
            ("cheap", "expensive"), ("cheapest", "costliest"), ("fast", "slow"), ("faster", "slower"),
            ("fastest", "slowest"), ("good", "bad"), ("easy", "hard", "difficult"), ("easiest", "hardest"),
            ("big", "small"), ("bigger", "smaller"), ("biggest", "smallest"), ("largest", "smallest"),
            ("long", "short"), ("longer", "shorter"), ("old", "new"), ("first", "last"), ("top", "bottom"),
            ("rich", "poor"), ("gain", "lose"), ("win", "lose"), ("buy", "sell"), ("start", "stop"),
            ("positive", "negative"), ("true", "false"), ("legal", "illegal"), ("safe", "dangerous")]
COMPARISON_WORDS = {word for group in _OPPOSED for word in group}
# Each comparison word's opposites: the other words of its groups ("lose" is the opposite of "gain" and "win").
OPPOSITES = {word: {other for g in _OPPOSED if word in g for other in g if other != word} for word in COMPARISON_WORDS}
# Words that join a list, whose items may come in any order ("apples and pears" / "pears and apples").
_LIST_JOINERS = {"and", "or", "vs", "versus", "nor", "between"}
# Capitalised words that are not names: question words, pronouns, determiners and the like.
_NOT_NAMES = {"i", "what", "which", "who", "whom", "whose", "why", "how", "when", "where", "is", "are", "was",
              "were", "do", "does", "did", "can", "could", "should", "would", "will", "shall", "may", "might",
              "the", "a", "an", "if", "in", "on", "for", "to", "of", "and", "or", "my", "your", "it", "this",
              "that", "there", "i'm", "i've", "i'd", "i'll", "be", "has", "have", "had", "am", "any", "some",
              "best", "most", "from", "with", "as", "at", "by", "quora", "please", "vs", "so", "also"}


def tokens(text: str) -> list[str]:
    """Words, numbers and "n't" of `text` ("don't" gives "do", "n't"), case kept."""
    return _TOKEN.findall(_SPLIT_NEGATION.sub(r"\1 n't", text))


def numbers(words: list[str]) -> set[str]:
    """The numbers a question names, digits or words ("two" and "2" are both "2"; "1,000" is "1000"; "1.50" is
    "1.5"; the word "one" is not a number here, see NUMBER_WORDS)."""
    found = set()
    for word in words:
        lower = word.lower()
        if lower[0].isdigit():
            digits = lower.replace(",", "")
            found.add(digits.rstrip("0").rstrip(".") if "." in digits else digits)
        elif lower in NUMBER_WORDS:
            found.add(NUMBER_WORDS[lower])
    return found


def names(words: list[str]) -> set[str]:
    """Words that look like names: capitalised (or all capitals) anywhere but as the question's first
    word, lower-cased, less the common words a question capitalises."""
    return {w.lower() for w in words[1:] if w[0].isupper() and w.lower() not in _NOT_NAMES}


def exchanged(first: list[str], second: list[str]) -> bool:
    """Whether two questions' words (case aside) are the same but for two that exchanged places, not next to
    each other nor joined by a list word (and, or, vs, ...): who does what to whom changed ("Do Indian women
    find American men attractive?" / "Do Indian men find American women attractive?", "convert benzene into
    toluene" / "convert toluene into benzene")."""
    if len(first) != len(second):
        return False
    differ = [k for k, (a, b) in enumerate(zip(first, second)) if a.lower() != b.lower()]
    if len(differ) != 2:
        return False
    i, j = differ
    return (first[i].lower() == second[j].lower() and first[j].lower() == second[i].lower() and j > i + 1
            and not {w.lower() for w in first[i + 1:j]} & _LIST_JOINERS)


GUARDS = ("numbers", "entities", "negation", "comparison", "opposites", "exchanged")


@dataclass(frozen=True)
class GuardFlags:
    """Which guards fired for one (query, cached question) pair: the hand-off from guards.py to the verifier's
    features (verifier.py). True means the two questions differ in that way."""

    numbers: bool
    entities: bool
    negation: bool
    comparison: bool
    opposites: bool
    exchanged: bool

    def fired(self, among: tuple[str, ...] = GUARDS) -> str | None:
        """The first of the guards `among` (in their order) that fired; None if none."""
        for name in among:
            if getattr(self, name):
                return name
        return None


def check(query: str, cached: str) -> GuardFlags:
    """The guards' flags for a new question `query` against a cached question `cached`.

    - numbers: the sets of numbers differ (one names a number the other does not);
    - entities: a name of one (see `names`) appears nowhere in the other, whatever its case;
    - negation: one has a negation word (not, no, never, n't, without, ...) and the other has none;
    - comparison: one has an opposed comparison word (best/worst, more/less, before/after, ...) the other
      lacks;
    - opposites: a comparison word only one has stands against its opposite only the other has ("positive
      effects" / "negative effects", "advantages" / "disadvantages"): the narrow case of `comparison` (which
      also fires on "the best way" / "a way"), rare among paraphrases. On the QQP tuning pairs at MiniLM cosine
      >= 0.89 it fires on 6 of 2762, 1 of them a duplicate (bench/results/semcache-qqp-2026-11-30.md);
    - exchanged: the same words but two that exchanged places (see `exchanged`). On all 12,379 QQP tuning
      pairs it fires on 5, 1 of them labelled a duplicate ("Quora answers (not questions)" / "Quora questions
      (not answers)"); all at cosine >= 0.97."""
    first, second = tokens(query), tokens(cached)
    lower_first, lower_second = {w.lower() for w in first}, {w.lower() for w in second}
    return GuardFlags(
        numbers=numbers(first) != numbers(second),
        entities=bool(names(first) - lower_second or names(second) - lower_first),
        negation=bool(lower_first & NEGATIONS) != bool(lower_second & NEGATIONS),
        comparison=(lower_first & COMPARISON_WORDS) != (lower_second & COMPARISON_WORDS),
        opposites=any(OPPOSITES[word] & (lower_second - lower_first)
                      for word in (lower_first - lower_second) & COMPARISON_WORDS),
        exchanged=exchanged(first, second),
    )
